"""Float training end to end at tiny size, against a real sqlite MLflow store in tmp_path."""

import pytest
from mlflow.tracking import MlflowClient

from deeplabq.export import op_histogram, xnnpack_partitions
from deeplabq.tasks.train import train

from .conftest import compose_config, only_run


def test_float_run_loss_falls_and_everything_is_logged(tiny_float_run):
    metrics = tiny_float_run.metrics
    client = MlflowClient(tiny_float_run.store)
    run = client.get_run(tiny_float_run.run_id)
    assert run.info.status == "FINISHED"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 6  # every 4 of 24 steps
    assert losses[-1] < losses[0], losses  # that the model learns: tests/test_learning.py
    # Resolved config as flat params, tags from the group choices, a readable run name.
    params = run.data.params
    assert params["backbone.depth_multiplier"] == "0.5"
    assert params["train.steps"] == "24"
    assert run.data.tags["deeplabq.quant"] == "float"
    assert run.info.run_name == "float-dm0.5-os16-synthetic"
    for key in ("keras/miou", "keras/pixel_accuracy", "float/miou", "float/size_bytes", "float/latency_ms_t1",
                "float/latency_ms_t2", "float/agreement", "float/xnnpack_partitions", "dynamic_range/miou",
                "images_per_sec", "learning_rate", "deploy/miou", "deploy/size_bytes", "deploy/latency_ms_t1"):
        assert key in run.data.metrics, key
    assert any(k.startswith("float/iou/") for k in run.data.metrics)
    assert run.data.metrics["float/agreement"] >= 0.99
    assert run.data.metrics["float/xnnpack_partitions"] == 1
    assert metrics["deploy/miou"] == pytest.approx(run.data.metrics["float/miou"])
    assert 0 <= run.data.metrics["deploy/miou"] <= 100 and run.data.metrics["deploy/delta_miou"] == 0  # percent
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "tflite"} <= artifacts
    tflite = {a.path for a in client.list_artifacts(run.info.run_id, "tflite")}
    assert {"tflite/float.tflite", "tflite/dynamic_range.tflite", "tflite/float_ops.json"} <= tflite
    ckpts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/ckpt-24.index" in ckpts


def test_float_tflite_keeps_dilated_convs_native_and_is_one_xnnpack_partition(tiny_float_run):
    tflite = (tiny_float_run.path / "tflite" / "float.tflite").read_bytes()
    ops = op_histogram(tflite)
    assert "SPACE_TO_BATCH_ND" not in ops and "BATCH_TO_SPACE_ND" not in ops
    assert ops["DEPTHWISE_CONV_2D"] == 17
    assert "ARG_MAX" in ops  # the seeds' ArgMax output
    assert xnnpack_partitions(tflite) == 1


def test_init_from_a_run_starts_training_from_its_weights(tmp_path, tiny_overrides, tiny_float_run):
    """init.source=run through train(): at a learning rate of 1e-12 the two steps leave the kernels where the
    source run's checkpoint has them (a scratch start would have random ones)."""
    import numpy as np
    import tensorflow as tf

    cfg = compose_config(tmp_path, [*tiny_overrides, "init.source=run", f"init.path={tiny_float_run.path}",
                                    "train.steps=2", "train.checkpoint_every_steps=2", "train.learning_rate=1e-12"])
    train(cfg, tmp_path / "run")
    assert only_run(tmp_path, status="FINISHED").data.tags["deeplabq.init"] == f"run:{tiny_float_run.path}"
    source = tf.train.load_checkpoint(str(tiny_float_run.path / "checkpoints" / "ckpt-24"))
    started = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-2"))
    kernels = [k for k in source.get_variable_to_shape_map() if k.startswith("model/") and "kernel" in k]
    assert len(kernels) > 50
    for key in kernels:
        np.testing.assert_allclose(started.get_tensor(key), source.get_tensor(key), atol=1e-6, err_msg=key)


def test_divergence_stops_the_run_before_a_poisoned_checkpoint(tmp_path, tiny_overrides):
    """Learning rate 1e6: the guard in the compiled step stops training as soon as the loss, a gradient or a
    weight is inf/NaN; every checkpoint left on disk has finite weights, and the run is FAILED."""
    import numpy as np
    import tensorflow as tf

    from deeplabq.training import TrainingDivergedError

    cfg = compose_config(tmp_path, [*tiny_overrides, "train.learning_rate=1e6", "train.steps=60",
                                    "train.checkpoint_every_steps=2", "train.log_every_steps=20"])
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+: .* is not finite; lower "
                                                    r"train.learning_rate \(now 1000000"):
        train(cfg, tmp_path / "run")
    assert "diverged" in only_run(tmp_path, status="FAILED").data.tags["deeplabq.error"]
    state = tf.train.get_checkpoint_state(str(tmp_path / "run" / "checkpoints"))
    assert state and state.all_model_checkpoint_paths  # written before the divergence (ckpt-2 here)
    for prefix in state.all_model_checkpoint_paths:
        reader = tf.train.load_checkpoint(prefix)
        for key in reader.get_variable_to_shape_map():
            value = reader.get_tensor(key)
            assert not np.issubdtype(np.asarray(value).dtype, np.floating) or np.isfinite(value).all(), (prefix, key)
    assert not (tmp_path / "run" / "tflite").exists()


def test_resume_without_a_checkpoint_is_refused_naming_the_runs_beside_it(tmp_path, tiny_overrides):
    (tmp_path / "a_real_run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "a_real_run" / "checkpoints" / "checkpoint").write_text('model_checkpoint_path: "ckpt-6"\n')
    cfg = compose_config(tmp_path, [*tiny_overrides, "resume=true"])
    with pytest.raises(FileNotFoundError, match="resume=true, but .*mistyped.* has no checkpoint.* it: .*a_real_run"):
        train(cfg, tmp_path / "mistyped_run_dir")
    only_run(tmp_path, status="FAILED")
