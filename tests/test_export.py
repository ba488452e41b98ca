"""deeplabq.export: every TFLite variant as LiteRT loads it, and export_variant's check before it writes.

One tiny random-weight model (conftest.TINY_SPEC, 33x33, 5 classes); each variant is converted once per module.
"""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from deeplabq import export
from deeplabq import quantization as Q
from deeplabq.config import ExportSpec

from .conftest import tiny_images

LABELS = (1, 33, 33)
LOGITS = (1, 33, 33, 5)


def io_details(tflite: bytes) -> tuple[dict, dict]:
    interpreter = Interpreter(model_content=tflite)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    return inp, out


def tensor_dtypes(tflite: bytes) -> set[str]:
    return {dtype for _, _, dtype in Q.tensor_types(tflite)}


@pytest.fixture(scope="module")
def converted(tiny_model, tiny_float_tflite):
    """{(variant, output): flatbuffer} of the tiny model."""
    calibration = tiny_images(2, seed=1)
    files = {("float", "labels"): tiny_float_tflite}
    for variant, output in (("float", "logits"), ("dynamic_range", "labels"), ("float16", "labels"),
                            ("int8", "logits")):
        files[variant, output] = export.to_tflite(tiny_model, variant, output=output,
                                                  representative_images=calibration)
    files["qat_int8", "labels"] = export.to_tflite(Q.quantize_model(tiny_model), "qat_int8")
    return files


@pytest.mark.parametrize(("variant", "output", "input_dtype", "output_dtype", "output_shape"), [
    ("float", "labels", np.float32, np.int32, LABELS),
    ("float", "logits", np.float32, np.float32, LOGITS),
    ("dynamic_range", "labels", np.float32, np.int32, LABELS),
    ("float16", "labels", np.float32, np.int32, LABELS),
    ("int8", "logits", np.uint8, np.int8, LOGITS),
    ("qat_int8", "labels", np.uint8, np.int32, LABELS),
])
def test_each_variant_loads_with_the_promised_input_and_output(converted, variant, output, input_dtype,
                                                               output_dtype, output_shape):
    inp, out = io_details(converted[variant, output])
    assert tuple(inp["shape"]) == (1, 33, 33, 3) and inp["dtype"] == input_dtype
    assert tuple(out["shape"]) == output_shape and out["dtype"] == output_dtype


def test_variants_store_weights_as_they_promise(converted):
    float_file = converted["float", "labels"]
    assert "FLOAT16" not in tensor_dtypes(float_file) and "INT8" not in tensor_dtypes(float_file)
    # dynamic range: int8 weights (a quarter of the float bytes), float16: half.
    assert len(converted["dynamic_range", "labels"]) < 0.5 * len(float_file)
    assert len(converted["float16", "labels"]) < 0.75 * len(float_file)
    # Full integer: int8 logits out; the one float tensor is the uint8 pixels' DEQUANTIZE at the input (requantized
    # to int8 at once, inside XNNPACK: deploy_graph.input_quantize_in_xnnpack), so every op is XNNPACK's.
    int8_logits = converted["int8", "logits"]
    floats = [name for _, name, dtype in Q.tensor_types(int8_logits) if dtype == "FLOAT32"]
    assert len(floats) == 1 and floats[0].endswith("/dequantized"), floats
    assert Q.op_histogram(int8_logits)["DEQUANTIZE"] == 1 and Q.undelegated_ops(int8_logits) == []
    assert Q.op_histogram(converted["qat_int8", "labels"]).get("ARG_MAX") == 1


def test_unknown_variant_and_int8_without_images_are_refused(tiny_model):
    with pytest.raises(ValueError, match="unknown TFLite variant 'int4'"):
        export.to_tflite(tiny_model, "int4")
    with pytest.raises(ValueError, match="representative_images"):
        export.to_tflite(tiny_model, "int8")


def test_float_file_agrees_with_its_keras_model(tiny_model, tiny_float_tflite):
    assert export.pixel_agreement(tiny_float_tflite, tiny_model, tiny_images(2)) == pytest.approx(1.0, abs=0.01)


def test_agreement_counts_the_pixels_that_differ(tiny_model, converted):
    """The int8 file of a random DeepLab flips some labels: the fraction is exactly the pixels that agree."""
    images, int8_logits = tiny_images(2), converted["int8", "logits"]
    agreement = export.pixel_agreement(int8_logits, tiny_model, images)
    # The input normalization folded into the input (deploy_graph): raw pixels in, the file says so.
    assert io_details(int8_logits)[0]["quantization"] == (pytest.approx(1 / 127.5), 128)
    assert Q.read_metadata(int8_logits) == {"input": "raw_pixels"}
    predicted = np.argmax(Q.run_tflite(int8_logits, np.stack(images)), axis=-1)
    expected = np.argmax(tiny_model(np.stack(images), training=False).numpy(), axis=-1)
    assert agreement == pytest.approx(np.mean(predicted == expected))


def test_export_variant_validates_then_writes(tmp_path, tiny_model):
    path = tmp_path / "tflite" / "float.tflite"
    exported = export.export_variant(tiny_model, "float", path, check_images=tiny_images(1),
                                     export_cfg=ExportSpec(), min_agreement=0.99)
    assert exported.variant == "float" and exported.path == path
    assert exported.size_bytes == path.stat().st_size > 0
    assert exported.agreement >= 0.99
    assert exported.op_histogram["ARG_MAX"] == 1 and exported.xnnpack_partitions >= 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["float.tflite"]  # no .partial left


def test_export_variant_refuses_a_file_below_min_agreement_and_writes_nothing(tmp_path, tiny_model):
    path = tmp_path / "tflite" / "float16.tflite"
    with pytest.raises(export.ExportError, match=r"'float16' agrees with its Keras model on only .*% of pixels"):
        export.export_variant(tiny_model, "float16", path, check_images=tiny_images(1), export_cfg=ExportSpec(),
                              min_agreement=1.01)
    assert not path.exists() and not path.with_name("float16.tflite.partial").exists()


def test_export_variant_names_a_variant_that_fails_to_convert(tmp_path, tiny_model):
    path = tmp_path / "int8.tflite"
    with pytest.raises(export.ExportError, match="TFLite variant 'int8' failed: ValueError: .*representative_images"):
        export.export_variant(tiny_model, "int8", path, check_images=tiny_images(1), export_cfg=ExportSpec())
    assert not path.exists()


def test_write_atomically_creates_folders_replaces_and_leaves_no_partial(tmp_path):
    path = tmp_path / "a" / "b" / "model.tflite"
    export.write_atomically(path, b"first")
    export.write_atomically(path, b"second")
    assert path.read_bytes() == b"second"
    assert [p.name for p in path.parent.iterdir()] == ["model.tflite"]


def test_float16_arithmetic_is_asked_for_in_the_file_only_when_set(tiny_model, converted):
    from ai_edge_litert import schema_py_generated as schema

    def metadata(tflite: bytes) -> dict[str, bytes]:
        model = schema.Model.GetRootAs(tflite, 0)
        entries = [model.Metadata(i) for i in range(model.MetadataLength())]
        return {e.Name().decode(): bytes(model.Buffers(e.Buffer()).DataAsNumpy()) for e in entries}

    # The converter's default: fp16 weights, fp32 accumulation (XNNPACK dequantizes the weights at load).
    assert metadata(converted["float16", "labels"])["reduced_precision_support"] == b"fp16accfp32"
    fp16 = export.to_tflite(tiny_model, "float16", float16_arithmetic=True)
    assert metadata(fp16)["reduced_precision_support"] == b"fp16accfp16"  # XNNPACK's fp16 path, ARMv8.2+
    assert export.pixel_agreement(fp16, tiny_model, tiny_images(1)) > 0.97  # x86: still fp32 arithmetic here


def test_every_variant_has_a_minimum_agreement():
    from deeplabq.reporting import MIN_AGREEMENT

    assert set(MIN_AGREEMENT) == set(export.VARIANTS)
