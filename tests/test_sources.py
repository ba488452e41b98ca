"""deeplabq.sources: every form a model source takes (.tflite file, run dir, checkpoint prefix, MLflow run id),
the run's architecture under the user's overrides, and the restored Keras model."""

import dataclasses
import json

import mlflow
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from omegaconf import OmegaConf

from deeplabq import sources, tracking
from deeplabq.checkpoints import CheckpointMismatchError
from deeplabq.model import build_deeplab
from deeplabq.sources import ModelSource, resolve_source, with_run_architecture

from .conftest import TINY_SPEC, compose_config, start_test_run

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(weights, run dir with checkpoints/ckpt-2 of a model whose every weight is random, a quantized phase)."""
    keras.utils.set_random_seed(1)
    model = build_deeplab(TINY_SPEC)
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    model.set_weights(weights)
    run_dir = tmp_path_factory.mktemp("sources") / "run"
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(run_dir / "checkpoints"), 2)
    manager.save()
    manager.save()
    (run_dir / "checkpoints" / sources.PHASE_FILE).write_text(json.dumps({"quantized": True}))
    (run_dir / tracking.RUN_ID_FILE).write_text(json.dumps({"run_id": RUN_ID}))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml({"backbone": {"depth_multiplier": 0.35}}))
    return weights, run_dir


def test_tflite_file_alone_and_inside_a_run(tmp_path, saved):
    alone = tmp_path / "model.tflite"
    alone.write_bytes(b"x")
    assert resolve_source(str(alone)) == ModelSource("tflite", alone)
    assert resolve_source(str(alone)).describe() == f"tflite {alone}"
    _, run_dir = saved
    inside = run_dir / "tflite" / "int8.tflite"
    inside.parent.mkdir(exist_ok=True)
    inside.write_bytes(b"x")
    source = resolve_source(str(inside))
    assert (source.kind, source.path, source.run_id) == ("tflite", inside, RUN_ID)
    assert source.run_config.backbone.depth_multiplier == 0.35
    assert source.describe() == f"tflite {inside} (MLflow run {RUN_ID})"


def test_run_dir_gives_its_latest_checkpoint_run_and_config(saved):
    _, run_dir = saved
    source = resolve_source(str(run_dir))
    assert (source.kind, source.path, source.run_id, source.quantized) == (
        "checkpoint", run_dir / "checkpoints" / "ckpt-2", RUN_ID, True)
    assert source.run_config.backbone.depth_multiplier == 0.35


def test_checkpoint_prefix_keeps_its_phase_but_knows_no_run(saved):
    _, run_dir = saved
    prefix = run_dir / "checkpoints" / "ckpt-1"
    assert resolve_source(str(prefix)) == ModelSource("checkpoint", prefix, None, None, quantized=True)


@pytest.mark.parametrize(("given", "error", "message"), [
    ("missing.tflite", FileNotFoundError, "TFLite file missing.tflite does not exist"),
    ("no/such/run", FileNotFoundError, "model source 'no/such/run' is not a .tflite file, a run directory"),
    ("", ValueError, "no model source given"),
    ("???", ValueError, "no model source given"),
])
def test_what_is_no_model_source_is_named(given, error, message):
    with pytest.raises(error, match=message):
        resolve_source(given)


def test_directory_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path}"):
        resolve_source(str(tmp_path))


def test_unknown_run_id_is_refused(mlflow_store):
    with pytest.raises(tracking.RunNotFoundError, match=f"'{'f' * 32}' does not exist"):
        resolve_source("f" * 32)


def test_run_id_and_its_artifacts_resolve_to_the_run(tmp_path, mlflow_store, saved):
    _, run_dir = saved
    with start_test_run(tmp_path) as run:
        mlflow.log_artifacts(str(run_dir / "checkpoints"), artifact_path="checkpoints")
        mlflow.log_artifact(str(run_dir / ".hydra" / "config.yaml"))
        tflite = tmp_path / "float.tflite"
        tflite.write_bytes(b"x")
        mlflow.log_artifact(str(tflite), artifact_path="tflite")
    artifacts = tmp_path / "mlartifacts" / run.info.run_id / "artifacts"
    source = resolve_source(run.info.run_id)
    assert (source.kind, source.path, source.run_id, source.quantized) == (
        "checkpoint", artifacts / "checkpoints" / "ckpt-2", run.info.run_id, True)
    assert source.run_config.backbone.depth_multiplier == 0.35
    # A file of the run's artifacts knows its run by the folder it is in.
    source = resolve_source(str(artifacts / "tflite" / "float.tflite"))
    assert (source.kind, source.run_id) == ("tflite", run.info.run_id)
    assert source.run_config.backbone.depth_multiplier == 0.35


@pytest.fixture
def trained_in(tmp_path) -> ModelSource:
    run_config = compose_config(tmp_path, ["backbone=mnv2_dm100", "head=deeplabv3plus", "dataset.crop_size=[97,97]"])
    return ModelSource("checkpoint", tmp_path / "ckpt-1", RUN_ID, run_config)


def test_architecture_and_dataset_follow_the_run(tmp_path, trained_in):
    cfg = compose_config(tmp_path)
    merged = with_run_architecture(cfg, trained_in)
    assert merged.backbone.depth_multiplier == 1.0 and merged.head.decoder_output_stride == 4
    assert list(merged.dataset.crop_size) == [97, 97]
    assert cfg.backbone.depth_multiplier == 0.5 and list(cfg.dataset.crop_size) == [129, 129]  # unchanged
    assert with_run_architecture(cfg, dataclasses.replace(trained_in, run_config=None)) is cfg


def test_command_line_overrides_win_over_the_run(tmp_path, trained_in):
    overrides = ["backbone.output_stride=8", "dataset.crop_size=[65,65]", "eval.max_images=2"]
    merged = with_run_architecture(compose_config(tmp_path, overrides), trained_in, overrides)
    assert merged.backbone.depth_multiplier == 1.0 and merged.backbone.output_stride == 8
    assert list(merged.dataset.crop_size) == [65, 65] and merged.head.name == "deeplabv3plus"


def test_another_dataset_on_the_command_line_keeps_its_own_preprocessing(tmp_path, trained_in):
    merged = with_run_architecture(compose_config(tmp_path, ["dataset=camvid"]), trained_in, ["dataset=camvid"])
    assert merged.dataset.name == "camvid" and list(merged.dataset.crop_size) != [97, 97]
    assert merged.backbone.depth_multiplier == 1.0  # the architecture always follows the run


def test_load_keras_model_restores_exactly_the_saved_weights(saved):
    weights, run_dir = saved
    source = ModelSource("checkpoint", run_dir / "checkpoints" / "ckpt-2")
    model = sources.load_keras_model(TINY_SPEC, source)
    restored = model.get_weights()
    assert len(restored) == len(weights)
    for expected, got in zip(weights, restored, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_load_keras_model_of_another_architecture_names_the_checkpoint(saved):
    _, run_dir = saved
    prefix = run_dir / "checkpoints" / "ckpt-2"
    with pytest.raises(CheckpointMismatchError, match="ckpt-2"):
        sources.load_keras_model(dataclasses.replace(TINY_SPEC, num_classes=3), ModelSource("checkpoint", prefix))
