"""Each quantization mode end to end at tiny size, and the bad inputs of quantized runs."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from mlflow.tracking import MlflowClient

from deeplabq.checkpoints import CheckpointMismatchError, load_run_weights
from deeplabq.config import ConfigError, RunSpec
from deeplabq.data import input_pipeline, open_split
from deeplabq.export import ExportError
from deeplabq.model import build_deeplab, spec_from_config
from deeplabq.quant_modes.common import start_quantization
from deeplabq.reporting import export_and_measure
from deeplabq.tasks.train import train

from .conftest import TINY, compose_config, only_run, run_id_of


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """A tiny float run that the QAT fine-tune and PTQ runs start from."""
    tmp_path = tmp_path_factory.mktemp("float")
    cfg = compose_config(tmp_path, [*TINY, "train.steps=16", "train.learning_rate=0.05"])
    train(cfg, tmp_path / "run")
    return tmp_path / "run"


def _qat_wrapped(model) -> bool:
    return any(type(layer).__name__.startswith("QuantizeWrapper") for layer in model.layers)


def test_before_the_delay_the_model_is_the_float_model_after_it_fake_quant_is_active(tmp_path, float_run):
    cfg = compose_config(tmp_path, TINY)
    float_model = build_deeplab(spec_from_config(cfg))
    load_run_weights(float_model, float_run)
    assert not _qat_wrapped(float_model)
    images = [next(iter(input_pipeline(open_split(cfg.dataset, "train"), cfg.dataset, training=True, batch_size=4)))]
    qat_model = start_quantization(float_model, iter(images))
    assert _qat_wrapped(qat_model)
    batch = images[0][0]
    float_out = float_model(batch, training=False).numpy()
    qat_out = qat_model(batch, training=False).numpy()
    # Same weights, so nearly the same logits; fake quantization (on) makes them differ.
    assert not np.allclose(float_out, qat_out, atol=1e-4)
    assert np.corrcoef(float_out.ravel(), qat_out.ravel())[0, 1] > 0.9
    assert np.mean(float_out.argmax(-1) == qat_out.argmax(-1)) > 0.8
    # Batch norm still trains: fit freezes it, at quant.freeze_bn_delay (see the tests below).
    bns = [layer for layer in qat_model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(layer.trainable for layer in bns)


@pytest.mark.parametrize("scheme", ["int8", "dynamic_range", "float16"])
def test_ptq_from_a_float_run(tmp_path, float_run, scheme):
    # int8: converted in the child process (its per-layer error report too), the other schemes in this one.
    cfg = compose_config(tmp_path, [*TINY, "quant=ptq", f"quant.scheme={scheme}", "export.int8_float_worst_layers=2",
                                    f"export.isolate_conversion={str(scheme == 'int8').lower()}",
                                    f"quant.float_checkpoint={run_id_of(float_run)}",
                                    f"tracking.tracking_uri=sqlite:///{float_run.parent / 'mlflow.db'}"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["deploy/miou"] == metrics[f"{scheme}/miou"]
    assert (tmp_path / "run" / "tflite" / f"{scheme}.tflite").is_file()
    assert metrics[f"{scheme}/size_bytes"] < metrics["float/size_bytes"]
    if scheme == "int8":
        listed = (tmp_path / "run" / "calibration_images.txt").read_text().splitlines()
        assert len(listed) == 4 and all(line.startswith("synthetic:train/") for line in listed)
        # The per-layer error report, and its two worst layers kept in float.
        report = (tmp_path / "run" / "tflite" / "int8_layer_errors.csv").read_text().splitlines()
        assert report[0].startswith("layer,op,rmse/scale") and len(report) > 50
        worst = list(dict.fromkeys(line.split(",")[0] for line in report[1:]))[:2]
        run = MlflowClient(f"sqlite:///{float_run.parent / 'mlflow.db'}").get_run(run_id_of(tmp_path / "run"))
        assert run.data.tags["deeplabq.int8_float_layers"] == ",".join(worst)
        assert metrics["int8/float_layers"] == 2 and run.data.metrics["int8/float_layers"] == 2


def test_an_unknown_float_layer_fails_the_int8_variant_only(tmp_path, float_run):
    cfg = compose_config(tmp_path, [*TINY, "quant=ptq", "quant.scheme=int8", f"quant.float_checkpoint={float_run}",
                                    "export.int8_debug_images=0", "export.int8_float_layers=[Conv1,Conv9]"])
    with pytest.raises(ExportError, match=r"'int8' failed: .*int8_float_layers: no op of layer\(s\) \['Conv9'\]"):
        train(cfg, tmp_path / "run")
    only_run(tmp_path, status="FAILED")
    assert (tmp_path / "run" / "tflite" / "float.tflite").is_file()
    assert not (tmp_path / "run" / "tflite" / "int8.tflite").exists()


def test_qat_finetune_without_float_checkpoint_is_refused(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, "quant=qat_finetune"])
    with pytest.raises(ConfigError, match="quant.float_checkpoint"):
        train(cfg, tmp_path / "run")
    only_run(tmp_path, status="FAILED")


def test_ptq_of_a_checkpoint_from_another_architecture_names_the_key_and_what_differs(tmp_path, float_run):
    store = f"sqlite:///{float_run.parent / 'mlflow.db'}"
    cfg = compose_config(tmp_path, [*TINY, "quant=ptq", "backbone=mnv2_dm100", f"tracking.tracking_uri={store}",
                                    f"quant.float_checkpoint={run_id_of(float_run)}"])
    with pytest.raises(CheckpointMismatchError) as info:
        train(cfg, tmp_path / "run")
    first, _, rest = str(info.value).partition("\n")
    assert first.startswith("quant.float_checkpoint=checkpoint ") and run_id_of(float_run) in first
    assert "its run has backbone.depth_multiplier=0.5 (this config: 1.0)" in first
    assert "backbone.output_stride" not in first and "shape" in rest  # only what differs; the details follow
    assert not (tmp_path / "run" / "tflite").exists()


def test_delay_beyond_training_is_refused(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, "quant=qat_delayed", "quant.delay_steps=12"])
    with pytest.raises(ConfigError, match="quant.delay_steps=12"):
        train(cfg, tmp_path / "run")


def test_more_calibration_samples_than_the_split_is_refused_before_training(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, "export.ptq_variants=[int8]", "quant.calibration_samples=25"])
    with pytest.raises(ValueError, match="quant.calibration_samples=25"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failing_variant_keeps_the_others_and_names_itself(tmp_path):
    import mlflow

    cfg = compose_config(tmp_path, TINY)
    model = build_deeplab(spec_from_config(cfg))
    split = open_split(cfg.dataset, "val")
    from deeplabq.tracking import setup_mlflow

    with mlflow.start_run(experiment_id=setup_mlflow(cfg.tracking)):
        with pytest.raises(ExportError, match="qat_int8"):
            export_and_measure(RunSpec.from_config(cfg), tmp_path / "run", ["float", "qat_int8"], train_split=split,
                               eval_split=split, float_model=model)
    assert (tmp_path / "run" / "tflite" / "float.tflite").is_file()
    assert not (tmp_path / "run" / "tflite" / "qat_int8.tflite").exists()


def _batch_norm_statistics(checkpoint_prefix) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(str(checkpoint_prefix))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith("model/") and ("moving_mean" in key or "moving_variance" in key)}


def test_batch_norm_freezes_at_freeze_bn_delay_inside_fit(tmp_path):
    # QAT from step 0, batch norm frozen at step 6 of 12, in the QAT model fit is training; checkpoints at 6 and 12.
    cfg = compose_config(tmp_path, [*TINY, "quant=qat_delayed", "quant.delay_steps=0", "quant.freeze_bn_delay=6"])
    train(cfg, tmp_path / "run")
    run = only_run(tmp_path, status="FINISHED")
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "quantization_started")] == [0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "batch_norm_frozen")] == [6]
    at_6 = _batch_norm_statistics(tmp_path / "run" / "checkpoints" / "ckpt-6")
    at_12 = _batch_norm_statistics(tmp_path / "run" / "checkpoints" / "ckpt-12")
    assert len(at_6) == len(at_12) > 50 and all("/layer/" in key for key in at_6)  # the QAT wrappers' BN layers
    # Steps 0-5 trained the statistics (they left their initial 0 / 1) ...
    assert all(not np.allclose(value, 0.0 if "mean" in key else 1.0) for key, value in at_6.items())
    # ... and steps 6-11 did not move them, while the weights kept training.
    assert all(np.array_equal(at_6[key], at_12[key]) for key in at_6)
    reader_6 = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-6"))
    reader_12 = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "ckpt-12"))
    kernels = [k for k in reader_6.get_variable_to_shape_map() if k.startswith("model/") and "/kernel/" in k]
    assert kernels and not all(np.array_equal(reader_6.get_tensor(k), reader_12.get_tensor(k)) for k in kernels)


def test_qat_from_step_0_learns(tmp_path):
    """Delayed QAT with delay 0 trains a fake-quantized network from initialisation.

    Measured at this size (97x97 crops, batch 8, 60 steps; ~35 s): float 23.3 keras mIoU; delay 0 21.7 keras /
    21.6 qat_int8. Before the activation ranges warmed up (tfmot's EMA 0.999 from ranges calibrated on the untrained
    network: the logits' range was [0, 1e-6]) and with batch norm frozen at the switch, delay 0 predicted
    background only: 12.5, the chance level here.
    """
    cfg = compose_config(tmp_path, [*TINY, "dataset.image_size=[90,96]", "dataset.crop_size=[97,97]",
                                    "dataset.splits.train=48", "train.batch_size=8", "train.steps=60",
                                    "train.log_every_steps=10", "train.checkpoint_every_steps=60",
                                    "quant=qat_delayed", "quant.delay_steps=0"])
    assert cfg.quant.freeze_bn_delay is None  # the default never freezes statistics that were not trained
    metrics = train(cfg, tmp_path / "run")
    run = only_run(tmp_path, status="FINISHED")
    assert "batch_norm_frozen" not in run.data.metrics
    losses = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "loss")]
    assert losses[-1] < 0.8 * losses[0], losses  # measured 1.55 -> 0.97 (float 1.52 -> 0.93; before: 1.609 -> 1.604)
    assert metrics["qat_int8/miou"] > 0.17, metrics["qat_int8/miou"]
    assert max(metrics.get(f"qat_int8/iou/{name}", 0.0) for name in cfg.dataset.class_names[1:]) > 0.2  # box: 0.39
