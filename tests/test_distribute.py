"""train.strategy, train.sync_batch_norm and train.mixed_precision (README, Scaling out) on tiny models.

``mirrored`` runs on two logical CPU devices and ``multi_worker`` as two local processes on 127.0.0.1; each must
give the losses of single-device training on the same global batch (global batch 4: two images per replica).
The compared runs cover float steps, the switch to QAT at step 2 (inside the strategy's scope) and a QAT step,
with batch norm in inference mode and no dropout: with batch statistics, the float32 rounding of fused against
unfused batch norm alone makes a tiny model's losses drift apart after the first step (synchronised batch norm
is checked on the first step instead), and dropout masks are drawn per replica.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from deeplabq.config import ConfigError
from deeplabq.tasks.train import train

from .conftest import ROOT, TINY, TINY_ARCHITECTURE, TINY_DATASET, compose_config, only_run, run_id_of

COMPARED = [*TINY, *TINY_DATASET, *TINY_ARCHITECTURE, "quant=qat_delayed", "quant.delay_steps=2", "train.steps=3",
            "train.log_every_steps=1", "train.checkpoint_every_steps=2", "train.fine_tune_batch_norm=false",
            "head.dropout_rate=0"]
RTOL = 1e-4


def _losses(tmp_path, run_dir) -> list[float]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return [m.value for m in client.get_metric_history(run_id_of(run_dir), "loss")]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory) -> list[float]:
    tmp_path = tmp_path_factory.mktemp("single")
    train(compose_config(tmp_path, COMPARED), tmp_path / "run")
    return _losses(tmp_path, tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_mirrored_on_two_logical_cpus_trains_the_single_device_steps(tmp_path, single_device):
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "distribute_mirrored_job.py"), str(tmp_path),
                           *COMPARED], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["replicas"] == 2
    run = only_run(tmp_path, status="FINISHED")
    np.testing.assert_allclose(_losses(tmp_path, tmp_path / "run"), single_device, rtol=RTOL)
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "quantization_started")] == [2]
    assert (tmp_path / "run" / "tflite" / "qat_int8.tflite").is_file()
    # Batch statistics of the global batch: the single-device loss; of each replica's half: another one.
    assert first["synchronized"] == pytest.approx(first["single"], rel=RTOL)
    assert abs(first["per_replica"] - first["single"]) > 100 * RTOL * first["single"], first


def test_multi_worker_with_two_local_processes_logs_once_from_the_chief(tmp_path, single_device):
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    store = [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
             f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]
    (tmp_path / "tmp").mkdir()
    workers = []
    for index in (1, 0):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TMPDIR": str(tmp_path / "tmp")}
        workers.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *COMPARED, "train.strategy=multi_worker", *store,
             f"hydra.run.dir={tmp_path / f'worker{index}'}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    only_run(tmp_path, status="FINISHED")  # the chief's: the other worker opened none
    np.testing.assert_allclose(_losses(tmp_path, tmp_path / "worker0"), single_device, rtol=RTOL)
    assert (tmp_path / "worker0" / "checkpoints" / "ckpt-3.index").is_file()
    assert (tmp_path / "worker0" / "tflite" / "qat_int8.tflite").is_file()
    left = {p.name for p in (tmp_path / "worker1").iterdir()}
    assert not left & {"checkpoints", "tflite", "figures", "mlflow_run.json"}, left
    assert not list((tmp_path / "tmp").iterdir())  # its checkpoints went to a temporary folder, now removed


def test_mixed_bfloat16_trains_float_and_exports_float32(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, *TINY_DATASET, *TINY_ARCHITECTURE, "train.steps=2",
                                    "train.log_every_steps=1", "train.mixed_precision=mixed_bfloat16"])
    metrics = train(cfg, tmp_path / "run")
    import tf_keras as keras

    assert keras.mixed_precision.global_policy().name == "float32"  # restored after training
    assert all(np.isfinite(_losses(tmp_path, tmp_path / "run")))
    assert metrics["float/agreement"] >= 0.99  # the float32 TFLite file agrees with the (float32) Keras copy
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-2"))
    dtypes = {key: dtype for key, dtype in reader.get_variable_to_dtype_map().items() if key.startswith("model/")}
    assert dtypes and all(dtype == tf.float32 for dtype in dtypes.values() if dtype.is_floating)  # float32 weights


def test_mixed_float16_scales_the_loss():
    import tf_keras as keras

    from deeplabq import distribute
    from deeplabq.config import TrainSpec
    from deeplabq.model import build_deeplab
    from deeplabq.training import Trainer

    from .conftest import TINY_SPEC, tiny_images

    spec = TrainSpec(steps=2, batch_size=2, optimizer="momentum", learning_rate=0.01, learning_policy="poly",
                     learning_power=0.9, end_learning_rate=0.0, momentum=0.9, adam_epsilon=1e-8, weight_decay=4e-5,
                     fine_tune_batch_norm=True, batch_norm_decay=0.9, log_every_steps=1, checkpoint_every_steps=1,
                     mixed_precision="mixed_float16")
    with distribute.training_scope(spec):
        trainer = Trainer(build_deeplab(TINY_SPEC), spec, 255, 0)
        loss, _ = trainer.train_step(np.stack(tiny_images(2)), np.zeros((2, 33, 33), np.int32))
    assert isinstance(trainer.optimizer, keras.mixed_precision.LossScaleOptimizer)
    assert trainer.model.layers[-2].compute_dtype == "float16" and np.isfinite(float(loss))
    assert float(trainer.optimizer.loss_scale) > 1  # dynamic loss scale, saved in checkpoints with the optimizer


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.strategy=foo"], "train.strategy"),
    (["train.mixed_precision=float16"], "train.mixed_precision"),
    (["quant=qat_delayed", "quant.delay_steps=4", "train.mixed_precision=mixed_bfloat16"], "train.mixed_precision"),
    (["train.strategy=multi_worker"], "TF_CONFIG"),
])
def test_bad_strategy_or_precision_fails_the_run_naming_the_key(tmp_path, monkeypatch, overrides, key):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cfg = compose_config(tmp_path, [*TINY, *overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as refused:
        train(cfg, tmp_path / "run")
    assert "\n" not in str(refused.value)
    only_run(tmp_path, status="FAILED")
