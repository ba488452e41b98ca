"""deeplabq.conversion_process: TFLite conversion in a child process, real TensorFlow, LiteRT and MLflow.

A converter that aborts in native code is simulated by the child's test hook (DEEPLABQ_TEST_ABORT_CONVERSION),
which makes it os.abort() when it reaches the named variant.
"""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from deeplabq import conversion_process, export, reporting
from deeplabq import data as data_lib
from deeplabq import quantization as Q
from deeplabq.config import ExportSpec, RunSpec

from .conftest import TINY, TINY_ARCHITECTURE, TINY_DATASET, TINY_SPEC, compose_config, start_test_run, tiny_images


@pytest.fixture(scope="module")
def tiny_qat_model(tiny_model):
    """The QAT model of ``tiny_model``, its activation ranges calibrated (so not tfmot's initial ones) and its
    batch norm frozen as after quant.freeze_bn_delay (the child's fresh model has it trainable)."""
    qat_model = Q.quantize_model(tiny_model)
    Q.calibrate_activation_ranges(qat_model, [np.stack(tiny_images(2, seed=3))])
    assert Q.freeze_batch_norm(qat_model) > 0
    return qat_model


def test_the_child_rebuilds_models_with_the_parent_outputs(tmp_path, tiny_model, tiny_qat_model):
    models = {"float": tiny_model, "qat": tiny_qat_model}
    conversion_process.write_job(tmp_path, TINY_SPEC, models, ["float", "qat_int8"], ExportSpec())
    images = np.stack(tiny_images(2, seed=7))
    for kind, model in models.items():
        rebuilt = conversion_process.rebuild_model(tmp_path, kind, TINY_SPEC)
        assert rebuilt is not model
        np.testing.assert_array_equal(rebuilt(images, training=False).numpy(), model(images, training=False).numpy())
    # Logits that are not the rebuilt model's: refused, not converted.
    np.save(tmp_path / "float.expected.npy", np.load(tmp_path / "float.expected.npy") + 1.0)
    with pytest.raises(ValueError, match="float model rebuilt from its DeepLabSpec and weights differs"):
        conversion_process.rebuild_model(tmp_path, "float", TINY_SPEC)


def test_a_crashing_conversion_fails_its_variant_only(tmp_path, mlflow_store, monkeypatch, tiny_model,
                                                      tiny_float_tflite):
    """The child aborts (SIGABRT) at dynamic_range: that variant fails, named with the signal and the child's last
    line; a new child converts float16. The child's files are byte for byte the in-process conversion's."""
    cfg = compose_config(tmp_path, [*TINY, *TINY_DATASET, *TINY_ARCHITECTURE, "eval.max_images=1",
                                    "eval.latency_threads=[1]", "export.isolate_conversion=true"])
    spec = RunSpec.from_config(cfg)
    assert spec.model == TINY_SPEC and spec.export.isolate_conversion
    monkeypatch.setenv(conversion_process.ABORT_HOOK, "dynamic_range")
    out = tmp_path / "out"
    with start_test_run(tmp_path) as run:
        with pytest.raises(export.ExportError) as raised:
            reporting.export_and_measure(spec, out, ["float", "dynamic_range", "float16"],
                                         train_split=data_lib.open_split(cfg.dataset, "train"),
                                         eval_split=data_lib.open_split(cfg.dataset, "val"), float_model=tiny_model)
    message = str(raised.value)
    assert message.startswith("TFLite variant 'dynamic_range' failed: the conversion process was killed by SIGABRT "
                              "while converting it (converter: ")
    assert "aborting (test hook)" in message and "'float'" not in message and "float16" not in message
    assert sorted(p.name for p in (out / "tflite").iterdir()) == ["float.tflite", "float16.tflite"]
    assert (out / "tflite" / "float.tflite").read_bytes() == tiny_float_tflite
    assert (out / "tflite" / "float16.tflite").read_bytes() == export.to_tflite(tiny_model, "float16")
    logged = MlflowClient().get_run(run.info.run_id).data
    assert logged.tags["deeplabq.export_error.dynamic_range"] == message
    assert not any(key.startswith("deeplabq.export_error.") for key in logged.tags if "dynamic_range" not in key)
    assert logged.metrics["float/agreement"] >= 0.99 and logged.metrics["float16/agreement"] >= 0.97
    assert not any(key.startswith("dynamic_range/") for key in logged.metrics)
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "tflite")} == {
        "tflite/float.tflite", "tflite/float_ops.json", "tflite/float16.tflite", "tflite/float16_ops.json"}
