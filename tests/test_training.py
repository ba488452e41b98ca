"""Float training end to end at tiny size, against a real sqlite MLflow store in tmp_path."""

import pytest
from mlflow.tracking import MlflowClient

from deeplabq.config import ConfigError
from deeplabq.data import DatasetError
from deeplabq.export import op_histogram, xnnpack_partitions
from deeplabq.tasks.train import train

from .conftest import compose_config, only_run, run_id_of


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny float run shared by the assertions below (training is the slow part)."""
    from .conftest import TINY

    tmp_path = tmp_path_factory.mktemp("float_run")
    cfg = compose_config(tmp_path, [*TINY, "train.steps=24", "train.learning_rate=0.05",
                                    "export.ptq_variants=[dynamic_range]"])
    metrics = train(cfg, tmp_path / "run")
    return tmp_path, metrics


def test_float_run_loss_falls_and_everything_is_logged(trained):
    tmp_path, metrics = trained
    run = only_run(tmp_path, status="FINISHED")
    client = MlflowClient()
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 6  # every 4 of 24 steps
    assert losses[-1] < losses[0], losses
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


def test_float_tflite_keeps_dilated_convs_native_and_is_one_xnnpack_partition(trained):
    tmp_path, _ = trained

    tflite = (tmp_path / "run" / "tflite" / "float.tflite").read_bytes()
    ops = op_histogram(tflite)
    assert "SPACE_TO_BATCH_ND" not in ops and "BATCH_TO_SPACE_ND" not in ops
    assert ops["DEPTHWISE_CONV_2D"] == 17
    assert "ARG_MAX" in ops  # the seeds' ArgMax output
    assert xnnpack_partitions(tflite) == 1


def test_resume_continues_into_the_same_run(tmp_path, tiny_overrides):
    cfg = compose_config(tmp_path, [*tiny_overrides, "train.steps=6"])
    train(cfg, tmp_path / "run")
    first = run_id_of(tmp_path / "run")
    cfg = compose_config(tmp_path, [*tiny_overrides, "train.steps=12", "resume=true"])
    train(cfg, tmp_path / "run")
    assert run_id_of(tmp_path / "run") == first
    run = only_run(tmp_path, status="FINISHED")
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert steps == [4, 6, 8, 12], steps  # the second job started at step 6, not 0


def test_missing_dataset_root_fails_the_run_with_the_path(tmp_path, tiny_overrides):
    missing = tmp_path / "no_such_camvid"
    not_synthetic = [o for o in tiny_overrides if not o.startswith("dataset")]
    cfg = compose_config(tmp_path, [*not_synthetic, "dataset=camvid", f"dataset.root={missing}"])
    with pytest.raises(DatasetError, match=str(missing)):
        train(cfg, tmp_path / "run")
    run = only_run(tmp_path, status="FAILED")
    assert "no_such_camvid" in run.data.tags["deeplabq.error"]
    assert not (tmp_path / "run" / "tflite").exists()


def test_impossible_config_value_fails_the_run(tmp_path, tiny_overrides):
    cfg = compose_config(tmp_path, [*tiny_overrides, "backbone.output_stride=12"])
    with pytest.raises(ConfigError, match="backbone.output_stride"):
        train(cfg, tmp_path / "run")
    only_run(tmp_path, status="FAILED")


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
