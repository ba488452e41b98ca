"""Exact resume: a training process killed with SIGKILL after a checkpoint, resumed with ``resume=true``,
ends where the uninterrupted run of the same config ends: same losses, same final weights."""

import signal
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf
from mlflow.tracking import MlflowClient

from deeplabq.tasks.train import train
from deeplabq.tracking import setup_mlflow

from .conftest import ROOT, TINY, compose_config, run_id_of

STEPS = ["train.steps=30", "train.checkpoint_every_steps=10", "train.log_every_steps=5"]


def _losses(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run_id_of(tmp_path / "run"), "loss")
    return [m.step for m in history], np.array([m.value for m in history])


def _weights(tmp_path) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-30"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith("model/")}


def _start_and_kill_after_a_checkpoint(tmp_path) -> int:
    """``python train.py`` with the test's config, SIGKILLed as soon as its first checkpoint is on disk."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tmp_path.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *TINY, *STEPS, f"tracking.tracking_uri={store}",
         f"tracking.artifact_location={tmp_path / 'mlartifacts'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    index = tmp_path / "run" / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 300
    while not index.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return int(tf.train.latest_checkpoint(str(index.parent)).rsplit("-", 1)[1])


def test_a_killed_run_resumes_exactly_where_it_stopped(tmp_path):
    train(compose_config(tmp_path / "whole", [*TINY, *STEPS]), tmp_path / "whole" / "run")

    killed_at = _start_and_kill_after_a_checkpoint(tmp_path / "killed")
    assert killed_at < 30, "the process finished before it could be killed"
    run_id = run_id_of(tmp_path / "killed" / "run")
    cfg = compose_config(tmp_path / "killed", [*TINY, *STEPS, "resume=true"])
    setup_mlflow(cfg.tracking)  # what any next deeplabq start does: the dead process's run is marked KILLED
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    train(cfg, tmp_path / "killed" / "run")

    assert run_id_of(tmp_path / "killed" / "run") == run_id  # the same MLflow run, now FINISHED
    assert MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}").get_run(run_id).info.status == "FINISHED"
    steps, losses = _losses(tmp_path / "killed")
    whole_steps, whole_losses = _losses(tmp_path / "whole")
    assert steps == whole_steps == list(range(5, 31, 5))  # every window once: none logged twice, none lost
    np.testing.assert_allclose(losses, whole_losses, rtol=1e-4)  # same batches, augmentation and dropout masks
    whole = _weights(tmp_path / "whole")
    resumed = _weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
