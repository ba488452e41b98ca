"""The team tracking server (deeplabq.server): a real PostgreSQL cluster and a real ``mlflow server --app-name
basic-auth`` with proxied artifacts, on free ports, in a temp folder, stopped at the end of the module.

Skipped when PostgreSQL is not installed here; under CI (CI set) that is a failure: .ci/run installs it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from deeplabq import sources, tracking
from deeplabq.server import ServerError, TrackingServer, free_port, postgres_bindir

from .conftest import ROOT, TINY, compose_config

pytestmark = pytest.mark.slow

USERS = {"alice": "alice-secret-7f3a9", "bob": "bob-secret-51c2e"}  # alice owns experiments, bob only reads


@contextlib.contextmanager
def as_user(name: str | None, password: str | None = None):
    """MLflow's credentials in this process's environment, as a team member's shell has them."""
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    if name:
        os.environ.update(MLFLOW_TRACKING_USERNAME=name, MLFLOW_TRACKING_PASSWORD=password or USERS[name])
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


def job_env(user: str | None) -> dict[str, str]:
    """A user's shell: none of the variables deeplabq, MLflow or pytest set here, plus this user's credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPLABQ_", "MLFLOW_", "PYTEST_"))}
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=USERS[user])
    return env


@pytest.fixture(scope="module")
def server():
    try:
        postgres_bindir()
    except ServerError as error:
        if os.environ.get("CI"):
            pytest.fail(f"CI must test the tracking server: {error} (.ci/run installs it)")
        pytest.skip(str(error))
    base = Path(tempfile.mkdtemp(prefix="deeplabq-server-"))
    base.chmod(0o711)  # run as root, PostgreSQL runs as 'postgres', which must enter it
    srv = TrackingServer(base / "state", port=free_port(), mlflow_args=["--workers", "1"])
    try:
        srv.start()
        admin = srv.admin_password_file.read_text().strip()
        with as_user("admin", admin):
            auth = get_app_client("basic-auth", tracking_uri=srv.url)
            for name, password in USERS.items():
                auth.create_user(name, password)
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


def train_command(server, experiment: str, *overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "train.py", *(["-m"] if multirun else []), *TINY, f"tracking.tracking_uri={server.url}",
            f"tracking.experiment_name={experiment}", *overrides]


def test_an_unauthenticated_request_is_refused(server, tmp_path):
    for auth in (None, "alice:wrong-password"):
        request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1")
        if auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401
    # a job without credentials: one line naming what to set, nothing logged
    cfg = compose_config(tmp_path, [f"tracking.tracking_uri={server.url}", "tracking.experiment_name=nobody"])
    with as_user(None), pytest.raises(tracking.TrackingAccessError) as error:
        tracking.setup_mlflow(cfg.tracking)
    assert "refused no credentials (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) (HTTP 401)" in \
        str(error.value)
    # a sweep with a wrong password: one line before any job, exit status 2
    env = {**job_env(None), "MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "wrong"}
    done = subprocess.run(train_command(server, "nobody", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                        multirun=True), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"deeplabq: error: the tracking server {server.url} refused user 'alice' and MLFLOW_TRACKING_PASSWORD "
        "(HTTP 401) while setting up experiment 'nobody'")
    assert "Traceback" not in done.stderr and not (tmp_path / "sweep").exists()


def test_credentials_in_the_tracking_uri_are_refused(tmp_path):
    cfg = compose_config(tmp_path, ["tracking.tracking_uri=http://alice:pw@127.0.0.1:1"])
    with pytest.raises(tracking.ConfigError, match="must not carry a password"):
        tracking.setup_mlflow(cfg.tracking)


def test_a_user_without_permission_on_an_experiment_cannot_write_to_it(server, tmp_path):
    client = MlflowClient(server.url)
    with as_user("alice"):
        experiment = client.create_experiment("alice-only")  # alice manages it; others have the default READ
        run = client.create_run(experiment)
    with as_user("bob"):
        assert client.get_run(run.info.run_id).info.run_id == run.info.run_id  # bob may read
        for write in (lambda: client.create_run(experiment), lambda: client.log_metric(run.info.run_id, "x", 1.0),
                      lambda: client.set_tag(run.info.run_id, "x", "y"),
                      lambda: client.set_terminated(run.info.run_id, "FAILED")):
            with pytest.raises(mlflow.exceptions.MlflowException) as refused:
                write()
            assert refused.value.error_code == "PERMISSION_DENIED"
        cfg = compose_config(tmp_path, [*TINY, f"tracking.tracking_uri={server.url}",
                                        "tracking.experiment_name=alice-only"])
        refused = r"user 'bob' may not write to the tracking server http://\S+ \(HTTP 403\) while setting up experiment"
        with pytest.raises(tracking.TrackingAccessError, match=refused):
            with tracking.tracked_run(cfg, tmp_path / "bob"):
                pass
    with as_user("alice"):
        (only,) = client.search_runs([experiment])  # bob added nothing
        assert only.info.run_id == run.info.run_id and only.info.status == "RUNNING"
        assert only.data.metrics == {} and "x" not in only.data.tags


def all_artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> dict[str, int]:
    found = {}
    for info in client.list_artifacts(run_id, folder):
        found.update(all_artifacts(client, run_id, info.path) if info.is_dir else {info.path: info.file_size})
    return found


def check_downloads(client: MlflowClient, run, tmp_path: Path, output_dir: Path | None = None) -> int:
    """Download every artifact of the run through the server: each has its listed size, and equals the job's
    own file where the job kept one. Returns how many were downloaded."""
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: no path of the server's disk
    listed = all_artifacts(client, run.info.run_id)
    dst = tmp_path / "downloads" / run.info.run_id
    dst.mkdir(parents=True)
    local = Path(client.download_artifacts(run.info.run_id, "", str(dst)))
    for path, size in listed.items():
        assert (local / path).stat().st_size == size > 0, path
        if output_dir is not None and (output_dir / path).is_file():
            assert (local / path).read_bytes() == (output_dir / path).read_bytes(), path
    return len(listed)


def test_a_sweep_of_four_parallel_jobs_loses_no_run_and_every_artifact_downloads(server, tmp_path, monkeypatch):
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(train_command(server, "sweep4", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
                                        "seed=0,1,2,3", f"hydra.sweep.dir={sweep_dir}", multirun=True),
                          cwd=ROOT, env=job_env("alice"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with as_user("alice"):
        client = MlflowClient(server.url)
        (experiment,) = [e for e in client.search_experiments() if e.name == "sweep4"]
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("deeplabq.sweep") == "parent"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(runs) == 5 and len(children) == 4, [r.info.run_name for r in runs]  # 0 lost, 0 extra
        assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep seed=0,1,2,3"
        assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2", "3"]
        assert all(c.info.status == "FINISHED" and "deploy/miou" in c.data.metrics for c in children)
        downloaded = check_downloads(client, parent, tmp_path)
        for child in children:
            output_dir = Path(child.data.params["paths.output_dir"])
            assert output_dir.parent == sweep_dir
            downloaded += check_downloads(client, child, tmp_path, output_dir)
        # a run id is a model source on a client without file access: its artifacts are downloaded once
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        mlflow.set_tracking_uri(server.url)
        source = sources.resolve_source(children[0].info.run_id)
        assert source.kind == "checkpoint" and source.run_id == children[0].info.run_id
        assert source.path.is_relative_to(tmp_path / "cache" / "deeplabq" / "runs" / children[0].info.run_id)
        assert source.run_config.seed == int(children[0].data.params["seed"])
    print(f"\n4-job sweep against the server: {len(runs)} runs of 5 expected, {downloaded} artifacts downloaded")
    # the credentials are in no param, tag, config artifact or line printed
    for run in runs:
        assert not any(USERS["alice"] in v for v in [*run.data.params.values(), *run.data.tags.values()])
    assert USERS["alice"] not in done.stdout + done.stderr
    assert not any(USERS["alice"] in p.read_text(errors="replace") for p in sweep_dir.rglob("*")
                   if p.is_file() and p.suffix in (".yaml", ".json", ".log", ".txt", ".md"))


def test_a_server_restart_in_the_middle_of_a_run(server, tmp_path):
    """The server is killed (SIGKILL, a crash) once the run has started, then started again: the client retries
    (MLflow's backoff) and the run finishes whole, or it ends with an error; never a FINISHED run whose stored
    artifacts differ from the job's files (deeplabq.tracking.verify_artifacts)."""
    output_dir = tmp_path / "run"
    job = subprocess.Popen(train_command(server, "restart", "train.steps=40", f"hydra.run.dir={output_dir}"),
                           cwd=ROOT, env=job_env("alice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_file = output_dir / tracking.RUN_ID_FILE
        deadline = time.monotonic() + 300
        while not run_file.is_file() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_file.is_file(), job.communicate()[1][-3000:]
        run_id = json.loads(run_file.read_text())["run_id"]
        with as_user("alice"):  # training has started: it logs a loss every 4 steps and a checkpoint every 6
            while not MlflowClient(server.url).get_run(run_id).data.metrics and job.poll() is None:
                time.sleep(0.5)
        assert job.poll() is None
        server.stop_mlflow(signal.SIGKILL)
        down = time.monotonic()
        server.start_mlflow()
        print(f"\nserver down for {time.monotonic() - down:.1f} s")
        stdout, stderr = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    with as_user("alice"):
        client = MlflowClient(server.url)
        run = client.get_run(run_id)
        # urllib3's warning for each request retried while the server was down (console or Hydra's job log)
        retried = (stdout + stderr + (output_dir / "train.log").read_text()).count("Retrying (")
        print(f"job exit {job.returncode}, run {run.info.status}, {retried} retried requests, "
              f"error: {run.data.tags.get('deeplabq.error')}")
        if job.returncode == 0:
            assert run.info.status == "FINISHED"
            assert check_downloads(client, run, tmp_path, output_dir) >= 3
            assert {"tflite/float.tflite", "config.yaml"} <= set(all_artifacts(client, run.info.run_id))
        else:  # a clear end: one error line, and the run is not FINISHED
            assert run.info.status != "FINISHED", stderr[-3000:]
            assert stderr.strip().splitlines()[-1].startswith(("deeplabq: error:", "mlflow.exceptions")), stderr
