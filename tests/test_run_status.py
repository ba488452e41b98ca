"""Runs of dead processes: a SIGKILLed job's run is marked KILLED by the next start, resumed to FINISHED, listed
by runs.py's report; live processes' runs, other hosts' runs and a sweep parent are judged correctly."""

import os
import signal
import socket
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from deeplabq import run_status, tracking
from deeplabq.sweep import MlflowSweepCallback

from .conftest import ROOT, TINY, compose_config, run_id_of

# A job that starts its tracked run and then waits to be killed.
JOB = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from deeplabq import tracking
with tracking.tracked_run(OmegaConf.load(sys.argv[1]), Path(sys.argv[2])):
    print("started", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def cfg(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return compose_config(tmp_path, TINY)


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


def test_a_sigkilled_job_is_marked_killed_listed_with_its_resume_command_and_resumed(tmp_path, cfg):
    out = tmp_path / "run"
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    env = {k: v for k, v in os.environ.items() if k != tracking.PARENT_ENV}
    job = subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path / "config.yaml"), str(out)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert job.stdout.readline() == "started\n"
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    client, run_id = MlflowClient(), run_id_of(out)
    assert client.get_run(run_id).info.status == "RUNNING"  # what the UI showed forever
    assert client.get_run(run_id).data.tags[tracking.PID_TAG] == str(job.pid)

    tracking.setup_mlflow(cfg.tracking)  # the next start against the store
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert killed.data.tags[tracking.ERROR_TAG] == f"process {job.pid} on {socket.gethostname()} is gone"

    (out / tracking.CHECKPOINT_DIR).mkdir()
    (out / tracking.CHECKPOINT_DIR / "checkpoint").write_text('model_checkpoint_path: "ckpt-6"\n')
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text("- quant=qat_delayed\n- dataset.image_size=[60,64]\n")
    listed = run_status.report(cfg.tracking.tracking_uri, "deeplabq", cwd=tmp_path)
    header, row, why, resume = listed.splitlines()
    assert header.split() == ["run", "status", "started", "host/pid", "output", "folder"]
    assert row.split()[:2] == ["float-dm0.5-os16-synthetic", "KILLED"]
    assert row.split()[-2:] == [f"{socket.gethostname()}/{job.pid}", "run"]
    assert why == f"    why: process {job.pid} on {socket.gethostname()} is gone"
    assert resume == (f"    resume: python {ROOT / 'train.py'} quant=qat_delayed 'dataset.image_size=[60,64]' "
                      "resume=true hydra.run.dir=run")

    with tracking.tracked_run(cfg, out, resume=True) as run:
        live = client.get_run(run_id)
        assert run.info.run_id == run_id and live.info.status == "RUNNING"
        assert live.data.tags[tracking.PID_TAG] == str(os.getpid()) and tracking.ERROR_TAG not in live.data.tags
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "no KILLED, FAILED or RUNNING run" in run_status.report(cfg.tracking.tracking_uri, "deeplabq")


def test_only_runs_of_gone_processes_on_this_host_are_marked(tmp_path, cfg):
    client, host = MlflowClient(), socket.gethostname()
    with tracking.tracked_run(cfg, tmp_path / "live") as live:
        experiment_id = live.info.experiment_id
        other_host = client.create_run(experiment_id, tags={tracking.HOST_TAG: "elsewhere",
                                                            tracking.PID_TAG: str(dead_pid())})
        untagged = client.create_run(experiment_id)  # started before deeplabq tagged processes
        gone = client.create_run(experiment_id, tags={tracking.HOST_TAG: host, tracking.PID_TAG: str(dead_pid())})
        reused = client.create_run(experiment_id, tags={**tracking.process_tags(), tracking.PID_START_TAG: "1"})
        tracking.setup_mlflow(cfg.tracking)
        status = {r: client.get_run(r.info.run_id).info.status for r in (live, other_host, untagged, gone, reused)}
        assert [status[r] for r in (live, other_host, untagged)] == ["RUNNING"] * 3
        assert status[gone] == status[reused] == "KILLED"
        assert client.get_run(reused.info.run_id).data.tags[tracking.ERROR_TAG] == \
            f"process {os.getpid()} on {host} is gone"  # same PID, another process start: not this process
    assert client.get_run(live.info.run_id).info.status == "FINISHED"


def test_a_sweep_parent_is_judged_by_the_process_that_made_it(tmp_path, cfg):
    callback = MlflowSweepCallback()
    callback.on_multirun_start(OmegaConf.create({"tracking": OmegaConf.to_container(cfg.tracking, resolve=True),
                                                 "hydra": {"overrides": {"task": ["quant.delay_steps=0,100"]}}}))
    parent = callback.parent_run_id
    try:
        tracking.setup_mlflow(cfg.tracking)  # a job of the sweep starting
        tags = MlflowClient().get_run(parent).data.tags
        assert MlflowClient().get_run(parent).info.status == "RUNNING"
        assert tags[tracking.PID_TAG] == str(os.getpid()) and tags[tracking.HOST_TAG] == socket.gethostname()
    finally:
        callback.on_multirun_end(None)
    assert MlflowClient().get_run(parent).info.status == "FINISHED"
