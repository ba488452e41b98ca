"""deeplabq.profiling: the per-op latency profile of a TFLite file, on LiteRT, of a real tiny model."""

import deeplabq  # noqa: F401, I001  (before TensorFlow)

import numpy as np

from deeplabq import profiling
from deeplabq.quantization import op_histogram


def test_every_op_is_timed_named_and_counted(tiny_float_tflite, tmp_path):
    profile = profiling.profile_ops(tiny_float_tflite, threads=1, runs=5, warmup=1)
    histogram = {}
    for op in profile.ops:
        histogram[op.op] = histogram.get(op.op, 0) + 1
    assert histogram == op_histogram(tiny_float_tflite)
    assert [op.index for op in profile.ops] == list(range(len(profile.ops)))
    assert profile.whole_ms > 0 and all(op.ms >= 0 for op in profile.ops)
    assert abs(sum(op.share for op in profile.ops) - 1) < 1e-6
    by_op = {op.op: op for op in profile.ops}
    assert not by_op["ARG_MAX"].delegated and by_op["CONV_2D"].delegated  # XNNPACK has no ARG_MAX
    first = next(op for op in profile.ops if op.op == "CONV_2D")
    assert first.layer == "Conv1_relu"  # named by its Keras layer
    # Conv1: 3x3, stride 2, 3 -> 11 channels (32 x depth multiplier 0.35), on a 33x33 input -> 17x17 out.
    assert first.macs == 17 * 17 * 11 * 3 * 3 * 3
    assert list(profile.by("op"))[0] in histogram
    profile.write_csv(tmp_path / "ops.csv")
    lines = (tmp_path / "ops.csv").read_text().splitlines()
    assert lines[0].startswith("index,op,layer,ms,share,macs,delegated") and len(lines) == len(profile.ops) + 1
    assert "sum of ops" in profiling.format_profile(profile)


def test_one_op_model_runs_the_op_on_its_own(tiny_float_tflite):
    """The cut-out model of an op computes what the op computes inside the whole file."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    model = schema.ModelT.InitFromPackedBuf(bytearray(tiny_float_tflite), 0)
    activations = profiling._activations(tiny_float_tflite, None, np.random.default_rng(0))
    graph = model.subgraphs[0]
    index = 5
    operator = graph.operators[index]
    one = Interpreter(model_content=profiling.one_op_model(model, index))
    one.allocate_tensors()
    variable = [t for t in operator.inputs if t >= 0 and not profiling._has_data(model, graph.tensors[t])]
    for detail, tensor in zip(one.get_input_details(), variable, strict=True):
        one.set_tensor(detail["index"], activations[tensor])
    one.invoke()
    (out,) = one.get_output_details()
    np.testing.assert_allclose(one.get_tensor(out["index"]), activations[operator.outputs[0]], rtol=1e-4, atol=1e-4)


def test_float16_and_dynamic_range_files_are_profiled_too(tiny_model):
    """A float16 file's weight DEQUANTIZE ops are constants (0 ms); dynamic-range convolutions, which XNNPACK
    takes but cannot run alone, are timed on TFLite's own kernels instead of failing the profile."""
    from deeplabq import export

    for variant in ("float16", "dynamic_range"):
        tflite = export.to_tflite(tiny_model, variant)
        profile = profiling.profile_ops(tflite, threads=1, runs=3, warmup=1)
        assert len(profile.ops) == sum(op_histogram(tflite).values()) and profile.whole_ms > 0
        if variant == "float16":  # the weights dequantized once, as constants: XNNPACK runs the convolutions
            assert all(op.ms == 0 for op in profile.ops if op.op == "DEQUANTIZE")
            assert all(op.delegated for op in profile.ops if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D"))
