"""The README's "Scaling out" commands (a team server, a SLURM sweep in local mode, mirrored, multi-worker and
mixed-precision training), run as written like those of test_readme.py, in a sandbox of their own: they need
nothing the main job made, so pytest-xdist runs this file beside test_readme.py on the other worker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT
from .test_readme import Sandbox, assert_sweep, make_sandbox

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    return make_sandbox(tmp_path_factory)


def test_team_server_admin_snippet_and_a_run_against_it(sandbox, tmp_path):
    """`bash dev.sh server` as written; its port and folder come from the environment (MLFLOW_PORT,
    DEEPLABQ_SERVER_DIR), as a user may set them: a free port, and a folder that PostgreSQL's user may enter
    when the tests run as root (pytest's temp folders are private to root)."""
    from deeplabq.server import ServerError, free_port, postgres_bindir

    try:
        postgres_bindir()
    except ServerError as error:  # CI installs it (.ci/run): there, its absence is a failure
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the team server: {error}")
        pytest.skip(str(error))
    state = Path(tempfile.mkdtemp(prefix="deeplabq-readme-server-"))
    state.chmod(0o711)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    server = sandbox.start("bash dev.sh server", env={"MLFLOW_PORT": str(port), "DEEPLABQ_SERVER_DIR": str(state)},
                           stdout=log)
    try:
        deadline = time.monotonic() + 240
        while "tracking server at" not in (tmp_path / "server.log").read_text() and time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        assert f"tracking server at {url}" in (tmp_path / "server.log").read_text()
        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials: 401
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
        assert refused.value.code == 401
        admin = {"MLFLOW_TRACKING_USERNAME": "admin",
                 "MLFLOW_TRACKING_PASSWORD": (state / "admin_password").read_text().strip()}
        snippet = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                       if "get_app_client" in b).replace("http://127.0.0.1:5000", url)
        done = subprocess.run([str(sandbox.root / ".venv" / "bin" / "python"), "-c", snippet], cwd=sandbox.root,
                              env={**sandbox.env, **admin}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        alice = {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "a long password of alice's"}
        sandbox.filled["<server>"] = f"127.0.0.1:{port}"
        done = sandbox.run("python train.py tracking.tracking_uri=http://<server>", env=alice)
        assert alice["MLFLOW_TRACKING_PASSWORD"] not in done.stdout + done.stderr
        client = MlflowClient(url)
        os.environ.update(admin)
        try:
            team = client.get_experiment_by_name("deeplabq")
            (run,) = client.search_runs([team.experiment_id])
            assert run.info.status == "FINISHED"
            assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # through the server
            assert "tflite/float.tflite" in {a.path for a in client.list_artifacts(run.info.run_id, "tflite")}
            assert f"browse: {url}/#/experiments/{team.experiment_id}/runs/{run.info.run_id}" in done.stdout
        finally:
            for key in admin:
                os.environ.pop(key, None)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # as Ctrl-C: the command stops MLflow and PostgreSQL
        server.wait(timeout=90)
        log.close()
        shutil.rmtree(state, ignore_errors=True)
    assert server.returncode == 0


def test_slurm_sweep_in_local_mode(sandbox):
    done = sandbox.run("python train.py -m hydra/launcher=slurm_local quant=qat_delayed quant.delay_steps=0,100")
    assert_sweep(sandbox, 2, done)
    sweep = sandbox.runs(deeplabq__sweep="parent")[-1]
    assert sweep.info.run_name == "sweep quant.delay_steps=0,100"
    (folder,) = [p for p in (sandbox.root / "multirun" / "synthetic").iterdir() if (p / ".submitit").is_dir()]
    assert len([p for p in (folder / ".submitit").iterdir() if p.name != "%j"]) == 2  # a submitit job per run


def test_mirrored_training(sandbox):
    sandbox.run("python train.py train.strategy=mirrored")
    run = sandbox.runs()[-1]
    assert run.info.status == "FINISHED" and run.data.params["train.strategy"] == "mirrored"
    assert "deploy/miou" in run.data.metrics


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_multi_worker_training_on_two_hosts(sandbox):
    before = len(sandbox.runs())
    sandbox.filled.update({"<host 1>": "127.0.0.1", "<host 2>": "127.0.0.1", "<port 1>": str(_free_port()),
                           "<port 2>": str(_free_port()), "<worker folder>": "outputs/worker1"})
    worker = sandbox.start("TF_CONFIG='{\"cluster\": {\"worker\": [\"<host 1>:<port 1>\", \"<host 2>:<port 2>\"]}, "
                           "\"task\": {\"type\": \"worker\", \"index\": 1}}' python train.py "
                           "train.strategy=multi_worker hydra.run.dir=<worker folder>", smoke=True)
    try:
        sandbox.run("TF_CONFIG='{\"cluster\": {\"worker\": [\"<host 1>:<port 1>\", \"<host 2>:<port 2>\"]}, "
                    "\"task\": {\"type\": \"worker\", \"index\": 0}}' python train.py train.strategy=multi_worker")
        assert worker.wait(timeout=600) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    runs = sandbox.runs()
    assert len(runs) == before + 1  # the chief's run only
    assert runs[-1].info.status == "FINISHED" and runs[-1].data.params["train.strategy"] == "multi_worker"
    assert not (sandbox.root / "outputs" / "worker1" / "checkpoints").exists()


def test_mixed_precision_training(sandbox):
    sandbox.run("python train.py train.mixed_precision=mixed_bfloat16")
    run = sandbox.runs()[-1]
    assert run.info.status == "FINISHED" and run.data.params["train.mixed_precision"] == "mixed_bfloat16"
    assert run.data.metrics["float/agreement"] >= 0.99
