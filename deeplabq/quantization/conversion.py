"""Conversion to TFLite: a converter of the model traced for LiteRT (:func:`tflite_converter`), the float
baseline (:func:`float_tflite`), the integer-only file of a QAT model (:func:`qat_to_tflite`) or of a float
model by post-training quantization (:func:`ptq_int8_tflite`, optionally with float layers), and the per-op
error of the PTQ model measured by TFLite's QuantizationDebugger on LiteRT (:func:`int8_layer_errors`).
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter
from tensorflow.lite.python import convert as _lite_convert

from deeplabq.errors import ConfigError
from deeplabq.model import native_dilated_convolutions
from deeplabq.quantization.inspection import tensor_types
from deeplabq.quantization.qat import prepare_for_int8

_INPUT_TYPES = {"uint8": tf.uint8, "int8": tf.int8, "float32": tf.float32}
_OUTPUTS = ("labels", "logits")


def _serving_function(model: keras.Model, output: str):
    """Concrete function image (1,H,W,3 float 0..255) -> logits or labels, traced for the converter.

    Traced inside ``native_dilated_convolutions()`` so each dilated depthwise conv is one
    DEPTHWISE_CONV_2D. ``labels`` puts the ArgMax inside the graph as int32: TFLite's ARG_MAX writes
    int32 directly, a uint8 label map needs one more op (CAST) outside XNNPACK for no measurable gain."""
    if output not in _OUTPUTS:
        raise ValueError(f"output must be one of {_OUTPUTS}, got {output!r}")
    height, width, channels = model.input_shape[1:]

    def serve(images):
        logits = model(images, training=False)
        if output == "logits":
            return logits
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    with native_dilated_convolutions():
        return tf.function(serve).get_concrete_function(tf.TensorSpec((1, height, width, channels), tf.float32))


def tflite_converter(model: keras.Model, output: str) -> tf.lite.TFLiteConverter:
    """A converter of ``model`` (image -> labels|logits) traced for TFLite; callers set the quantization."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_serving_function(model, output)], model)
    # By default the converter first saves the whole Keras model as a SavedModel, re-tracing every layer
    # (1-2 minutes for a tfmot model); freezing the concrete function gives the same graph in seconds.
    converter.experimental_lower_to_saved_model = False
    return converter


def _set_io_types(converter, input_type: str, output: str) -> None:
    if input_type not in _INPUT_TYPES:
        raise ValueError(f"input_type must be one of {tuple(_INPUT_TYPES)}, got {input_type!r}")
    converter.inference_input_type = _INPUT_TYPES[input_type]
    if output == "logits":
        # Integer in -> int8 logits out (no DEQUANTIZE); float32 in -> float32 logits out.
        converter.inference_output_type = tf.float32 if input_type == "float32" else tf.int8


def _convert(converter) -> bytes:
    with warnings.catch_warnings():
        # The frozen-function path asks for input statistics it then takes from the graph's fake quant.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def float_tflite(float_model: keras.Model, *, output: str = "labels") -> bytes:
    """Float32 TFLite of the float model (float 0..255 input): the baseline for the int8 files."""
    return _convert(tflite_converter(float_model, output))


def qat_to_tflite(qat_model: keras.Model, *, input_type: str = "uint8", output: str = "labels") -> bytes:
    """Integer-only TFLite of a calibrated (and trained) QAT model.

    ``input_type="uint8"``: raw 0..255 pixels, scale 1 and zero point 0 (the model normalizes inside;
    the only QUANTIZE is uint8 -> int8 at the input, on TFLite's kernel: XNNPACK does not convert uint8
    to int8). ``"int8"``: pixels - 128 (zero point -128), no QUANTIZE at all. ``"float32"``: 0..255
    floats, quantized by XNNPACK. ``output="labels"``: int32 class map (ArgMax in the graph, on
    TFLite's kernel: XNNPACK has no ARG_MAX); ``"logits"``: int8 logits (integer input) or float32
    logits (float32 input).
    """
    converter = tflite_converter(qat_model, output)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    _set_io_types(converter, input_type, output)
    return _convert(converter)


def _ptq_converter(float_model: keras.Model, images: list[np.ndarray], *, per_channel: bool, input_type: str,
                   output: str, ops=(tf.lite.OpsSet.TFLITE_BUILTINS_INT8,)) -> tf.lite.TFLiteConverter:
    def representative_dataset():
        for image in images:
            yield [image if image.ndim == 4 else image[None]]

    converter = tflite_converter(prepare_for_int8(float_model), output)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = list(ops)
    converter._experimental_disable_per_channel = not per_channel
    _set_io_types(converter, input_type, output)
    return converter


def ptq_int8_tflite(
    float_model: keras.Model,
    representative_images: Iterable,
    *,
    per_channel: bool = True,
    input_type: str = "uint8",
    output: str = "labels",
    float_layers: Iterable[str] = (),
) -> bytes:
    """Full-integer post-training quantized TFLite (MLPerf PTQ: 500 calibration images, H,W,3 in 0..255).

    Same graph as :func:`qat_to_tflite`, except that the uint8 input's scale/zero point come from the
    images' pixel range (1 and 0 when they span 0..255, as real photos do). ``per_channel=False``
    quantizes each weight tensor with one scale (smaller file, like the seeds' 751 KB / 2.2 MB files;
    less accurate, since BN-folded depthwise kernels vary a lot between channels).

    ``float_layers``: Keras layer names (e.g. ``"block_1_expand"``, as in :func:`int8_layer_errors`) whose
    ops stay float, with DEQUANTIZE/QUANTIZE around each float island -- the QuantizationDebugger's denylist
    (``denylisted_nodes``), applied by the same MLIR quantizer call. It trades speed for accuracy.
    """
    images = [np.asarray(image, np.float32) for image in representative_images]
    converter = _ptq_converter(float_model, images, per_channel=per_channel, input_type=input_type, output=output)
    float_layers = list(float_layers)
    if not float_layers:
        return _convert(converter)
    # What QuantizationDebugger.get_nondebug_quantized_model() does, but keeping the converter's I/O types
    # (the debugger's own call always makes a float32/int8 input): calibrate, then quantize all but the
    # denylisted ops, named by their output tensors (the same names before and after quantization).
    converter.experimental_mlir_quantizer = True
    converter._experimental_calibrate_only = True
    calibrated = _convert(converter)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return _lite_convert.mlir_quantize(
            calibrated, disable_per_channel=not per_channel, input_data_type=converter.inference_input_type,
            output_data_type=converter.inference_output_type,
            denylisted_nodes=_tensors_of_layers(calibrated, float_layers))


def ptq_int16x8_tflite(float_model: keras.Model, representative_images: Iterable, *, per_channel: bool = True,
                       output: str = "labels") -> bytes:
    """16x8 post-training quantized TFLite: int16 activations, int8 weights (TFLite's
    ``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``), calibrated like :func:`ptq_int8_tflite`.

    Input and output stay float32: 16x8 has no uint8 input, so the first op is a QUANTIZE float -> int16.
    ARG_MAX has no 16x8 kernel, so ``output="labels"`` falls back to a float ARG_MAX after a DEQUANTIZE
    (``TFLITE_BUILTINS`` is allowed for ops without a 16x8 version). XNNPACK runs no int16 op: the whole file
    runs on TFLite's own kernels, so its latency is that of the reference path, not of an accelerated one.
    """
    images = [np.asarray(image, np.float32) for image in representative_images]
    converter = _ptq_converter(float_model, images, per_channel=per_channel, input_type="float32", output=output,
                               ops=(tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                                    tf.lite.OpsSet.TFLITE_BUILTINS))
    return _convert(converter)


def layer_of_tensor(tensor_name: str) -> str:
    """The Keras layer an op output belongs to: ``deeplab/Conv1_relu/Relu6;deeplab/bn_Conv1/..;deeplab/
    Conv1/Conv2D1`` (a conv with its BN and ReLU fused) -> ``Conv1``; ``deeplab/normalize/add`` ->
    ``normalize``."""
    parts = tensor_name.split(";")[-1].split("/")
    return parts[1] if len(parts) > 2 else parts[0]


def _tensors_of_layers(tflite_bytes: bytes, layers: list[str]) -> list[str]:
    """Output tensor names of the ops of ``layers`` (any layer fused into an op selects the op)."""
    outputs = [name for _, name, _ in tensor_types(tflite_bytes)]
    selected, unknown = [], []
    for layer in layers:
        matches = [name for name in outputs if any(f"/{layer}/" in f"{part}/" for part in name.split(";"))]
        if matches:
            selected.extend(matches)
        else:
            unknown.append(layer)
    if unknown:
        known = sorted({layer_of_tensor(name) for name in outputs})
        raise ConfigError(f"export.int8_float_layers: no op of layer(s) {unknown} in the int8 model; "
                         f"layers: {', '.join(known)}")
    return sorted(set(selected))


class _LiteRTQuantizationDebugger(tf.lite.experimental.QuantizationDebugger):
    """TFLite's QuantizationDebugger with its models run by LiteRT's interpreter, like every other TFLite file
    here (the debugger's own, tf.lite.Interpreter, is deprecated). Same body as TF 2.21's
    ``_init_from_converter`` but for the interpreter class."""

    def _init_from_converter(self, options, converter, calibrated_model=None, float_model=None) -> None:
        self.quant_model = _lite_convert.mlir_quantize(
            calibrated_model, disable_per_channel=converter._experimental_disable_per_channel,
            fully_quantize=options.fully_quantize, enable_numeric_verify=True,
            denylisted_ops=options.denylisted_ops, denylisted_nodes=options.denylisted_nodes)
        self._quant_interpreter = LiteRTInterpreter(model_content=self.quant_model)
        self._float_interpreter = None if float_model is None else LiteRTInterpreter(model_content=float_model)


def int8_layer_errors(float_model: keras.Model, representative_images: Iterable, debug_images: Iterable, *,
                      per_channel: bool = True) -> list[dict]:
    """Per-op quantization error of the PTQ int8 model (TFLite's QuantizationDebugger), worst first.

    The debugger runs a model where every int8 op is followed by a NumericVerify against the float op
    fed with the same (dequantized) input, so each row is the error that op adds on its own. ``rmse/scale``
    is that error in units of the output's quantization step: ~0.29 (1/sqrt(12)) is pure rounding; far
    above it means a clipped range or a poorly quantized kernel -- candidates for ``float_layers``.
    """
    images = [np.asarray(image, np.float32) for image in representative_images]
    debug = [np.asarray(image, np.float32) for image in debug_images]
    converter = _ptq_converter(float_model, images, per_channel=per_channel, input_type="uint8", output="logits")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        debugger = _LiteRTQuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([image[None] if image.ndim == 3 else image] for image in debug))
        debugger.run()
    buffer = io.StringIO()
    debugger.layer_statistics_dump(buffer)
    rows = []
    for row in csv.DictReader(io.StringIO(buffer.getvalue())):
        scale = float(row["scale"])
        rows.append({
            "layer": layer_of_tensor(row["tensor_name"]),
            "op": row["op_name"],
            "rmse/scale": float(np.sqrt(float(row["mean_squared_error"]))) / scale,
            "max_abs_error/scale": float(row["max_abs_error"]) / scale,
            "scale": scale,
            "tensor": row["tensor_name"],
        })
    return sorted(rows, key=lambda row: -row["rmse/scale"])
