"""Each quantization mode end to end at tiny size, and the bad inputs of quantized runs."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf
from mlflow.tracking import MlflowClient

from deeplabq.checkpoints import CheckpointMismatchError
from deeplabq.config import ConfigError, RunSpec
from deeplabq.data import open_split
from deeplabq.export import ExportError
from deeplabq.model import build_deeplab, spec_from_config
from deeplabq.reporting import export_and_measure
from deeplabq.tasks.train import train

from .conftest import TINY, compose_config, only_run, run_id_of


def _checkpoint(prefix) -> dict[str, np.ndarray]:
    """The model's variables by checkpoint key (Keras numbers a process's ``quantize_layer``s: the number is cut)."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {re.sub(r"quantize_layer_\d+", "quantize_layer", key): reader.get_tensor(key)
            for key in reader.get_variable_to_shape_map() if key.startswith("model/")}


def test_fit_trains_the_float_model_until_the_delay_then_the_fake_quantized_one_from_its_weights(tmp_path):
    """Delayed QAT, switch at step 6 of 12 inside fit(): checkpoint 6 (written before the switch) is the float
    model, checkpoint 12 the fake-quantized one, which went on from the float weights of step 6."""
    cfg = compose_config(tmp_path, [*TINY, "quant=qat_delayed", "quant.delay_steps=6"])
    train(cfg, tmp_path / "run")
    run = only_run(tmp_path, status="FINISHED")
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "quantization_started")] == [6]
    before, after = (_checkpoint(tmp_path / "run" / "checkpoints" / f"ckpt-{n}") for n in (6, 12))
    assert not any("/layer/" in key or key.split("/")[-3].endswith(("_min", "_max")) for key in before)  # float
    wrapped = [key for key in after if "/layer/" in key]  # tfmot QuantizeWrappers around every layer
    assert len(wrapped) > 100
    ranges = [key for key in after if key.split("/")[-3].endswith(("_min", "_max"))]
    assert ranges and any(after[key] != 0 for key in ranges)  # activation ranges, calibrated then trained
    # Each kernel (matched by its shape), before and after the switch: continued from the float weights of step 6
    # (six more steps moved it a little), not initialised anew.
    shapes = [value.shape for key, value in before.items() if key.endswith("/kernel/.ATTRIBUTES/VARIABLE_VALUE")]
    unique = [shape for shape in shapes if shapes.count(shape) == 1]
    assert len(unique) > 5
    for shape in unique:
        (float_kernel,) = [v for k, v in before.items() if v.shape == shape and k.endswith("/kernel/.ATTRIBUTES/"
                                                                                          "VARIABLE_VALUE")]
        (qat_kernel,) = [v for k, v in after.items() if v.shape == shape and k.endswith("/layer/kernel/.ATTRIBUTES/"
                                                                                        "VARIABLE_VALUE")]
        assert not np.array_equal(float_kernel, qat_kernel)
        assert np.corrcoef(float_kernel.ravel(), qat_kernel.ravel())[0, 1] > 0.9, shape


def test_a_qat_checkpoint_resumes_exactly(tmp_path):
    """Delayed QAT switched on at step 3; resumed from its quantized checkpoint 6 of 12 (the whole run's, rewound),
    the run ends with the weights and losses of the uninterrupted run: same batches (the data stream continues),
    same activation-range warm-up."""
    overrides = [*TINY, "quant=qat_delayed", "quant.delay_steps=3", "train.log_every_steps=2"]
    train(compose_config(tmp_path, overrides), tmp_path / "run")
    run = only_run(tmp_path, status="FINISHED")
    client = MlflowClient()
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    checkpoints = tmp_path / "run" / "checkpoints"
    whole = _checkpoint(checkpoints / "ckpt-12")
    assert json.loads((checkpoints / "phase.json").read_text()) == {"quantized": True}  # ckpt-6 is quantized too
    (checkpoints / "checkpoint").write_text('model_checkpoint_path: "ckpt-6"\nall_model_checkpoint_paths: "ckpt-6"\n')
    for file in checkpoints.glob("ckpt-12.*"):
        file.unlink()

    train(compose_config(tmp_path, [*overrides, "resume=true"]), tmp_path / "run")
    run = only_run(tmp_path, status="FINISHED")  # the same run
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12]  # none logged twice
    resumed = _checkpoint(checkpoints / "ckpt-12")
    assert resumed.keys() == whole.keys()
    for key, value in whole.items():
        np.testing.assert_allclose(resumed[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert {m.step: m.value for m in history} == pytest.approx(losses, rel=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "dynamic_range", "float16"])
def test_ptq_from_a_float_run(tmp_path, tiny_float_run, scheme):
    # int8: converted in the child process (its per-layer error report too), the other schemes in this one.
    cfg = compose_config(tmp_path, [*TINY, "quant=ptq", f"quant.scheme={scheme}", "export.int8_float_worst_layers=2",
                                    f"export.isolate_conversion={str(scheme == 'int8').lower()}",
                                    f"quant.float_checkpoint={tiny_float_run.run_id}",
                                    f"tracking.tracking_uri={tiny_float_run.store}"])
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
        run = MlflowClient(tiny_float_run.store).get_run(run_id_of(tmp_path / "run"))
        assert run.data.tags["deeplabq.int8_float_layers"] == ",".join(worst)
        assert metrics["int8/float_layers"] == 2 and run.data.metrics["int8/float_layers"] == 2


def test_qat_finetune_without_float_checkpoint_is_refused(tmp_path):
    cfg = compose_config(tmp_path, [*TINY, "quant=qat_finetune"])
    with pytest.raises(ConfigError, match="quant.float_checkpoint"):
        train(cfg, tmp_path / "run")
    only_run(tmp_path, status="FAILED")


def test_ptq_of_a_checkpoint_from_another_architecture_names_the_key_and_what_differs(tmp_path, tiny_float_run):
    cfg = compose_config(tmp_path, [*TINY, "quant=ptq", "backbone=mnv2_dm100",
                                    f"tracking.tracking_uri={tiny_float_run.store}",
                                    f"quant.float_checkpoint={tiny_float_run.run_id}"])
    with pytest.raises(CheckpointMismatchError) as info:
        train(cfg, tmp_path / "run")
    first, _, rest = str(info.value).partition("\n")
    assert first.startswith("quant.float_checkpoint=checkpoint ") and tiny_float_run.run_id in first
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
