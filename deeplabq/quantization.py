"""8-bit quantization of DeepLab: QAT model (tfmot), range calibration, BN freezing, integer TFLite export.

The goal is a TFLite file that XNNPACK runs as ONE integer partition: every tensor between the uint8
input and the output is int8, and no QUANTIZE/DEQUANTIZE sits inside the graph. Three things in the
float model (``deeplabq.model``) stand in the way, and are rewritten here in a weight-preserving clone
(:func:`prepare_for_int8`) before quantization, for QAT and PTQ alike:

* ``Rescaling('normalize')`` lowers to MUL + ADD. QAT only observes the ADD's output, so the MUL's output
  has no range and stays float (a float island). It is replaced by a frozen 1x1 ``DepthwiseConv2D`` that
  computes exactly ``x / 127.5 - 1``: one int8 DEPTHWISE_CONV_2D whose quantized weights are exact.
* The image-pooling ``AveragePooling2D`` over the whole map lowers to AVERAGE_POOL_2D, which XNNPACK
  only delegates in float: in int8 it falls back to the TFLite kernel and splits the graph in two
  XNNPACK partitions. ``GlobalAveragePooling2D(keepdims=True)`` is the same average and lowers to MEAN,
  which XNNPACK runs in int8.
* ``Concatenate`` in int8 needs every input on the output's scale, or the converter inserts
  requantizing ops. The concat's inputs (through resizes and dropout, which keep the scale) therefore
  get no fake quantization of their own: the concat's output range is the range of all of them.

The remaining custom layers get explicit QuantizeConfigs, as the TF Model Garden QAT project does:
``ResizeBilinear`` and ``Dropout`` keep their input's scale (no-op config: an interpolation cannot leave
its input's range), and the whole-image mean quantizes its output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import deeplabq  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as _registry,
)

from deeplabq.model import CUSTOM_OBJECTS, ResizeBilinear, native_dilated_convolutions

_qk = tfmot.quantization.keras
_quantizers = _qk.quantizers
_default_8bit = _qk.default_8bit


# --------------------------------------------------------------------------------------------------------
# QuantizeConfigs for layers the default 8-bit registry does not know.


@keras.utils.register_keras_serializable(package="deeplabq")
class NoOpQuantizeConfig(_qk.QuantizeConfig):
    """No fake quantization at all: the output keeps the scale of the input (resize, dropout, concat inputs)."""

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


@keras.utils.register_keras_serializable(package="deeplabq")
class OutputQuantizeConfig(NoOpQuantizeConfig):
    """Fake-quantize only the output (weightless layers whose output range differs from the input's)."""

    def get_output_quantizers(self, layer):
        return [_quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]


class DepthwiseKernelQuantizer(_quantizers.LastValueQuantizer):
    """Per-channel fake quantization of a depthwise kernel ``(kh, kw, channels, multiplier)``.

    tfmot's conv weight quantizer takes the LAST axis as the channel axis. For a depthwise kernel that is
    the depth multiplier (1), so tfmot quantizes depthwise kernels per tensor
    (tensorflow/model-optimization#808), while TFLite quantizes the BN-folded DEPTHWISE_CONV_2D kernel per
    channel. The QAT model would train against a different (coarser) grid than the converted model runs:
    the int8 file then disagrees with its QAT model as much as with the float model. Here the kernel is
    viewed as ``(kh, kw, 1, channels * multiplier)`` -- TFLite's own depthwise layout -- and quantized per
    output channel; a per-channel BN scale folded in later keeps values on the grid, so the converter's
    kernel is exactly the QAT one.
    """

    def __init__(self, **kwargs):
        super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

    def build(self, tensor_shape, name, layer):
        channels = int(tensor_shape[-2]) * int(tensor_shape[-1])
        ranges = {}
        for key, init in (("min_var", -6.0), ("max_var", 6.0)):
            ranges[key] = layer.add_weight(
                f"{name}_{key[:3]}", shape=(channels,), initializer=keras.initializers.Constant(init), trainable=False
            )
        return ranges

    def __call__(self, inputs, training, weights, **kwargs):
        kh, kw, channels, multiplier = inputs.shape
        flat = tf.reshape(inputs, (kh, kw, 1, channels * multiplier))
        return tf.reshape(super().__call__(flat, training, weights, **kwargs), inputs.shape)

    def get_config(self):
        return {}


@keras.utils.register_keras_serializable(package="deeplabq")
class DepthwiseConvQuantizeConfig(_registry.Default8BitConvQuantizeConfig):
    """tfmot's DepthwiseConv2D config (kernel + activation) with a truly per-channel kernel quantizer."""

    def __init__(self, weight_attrs=("depthwise_kernel",), activation_attrs=("activation",), quantize_output=False):
        super().__init__(list(weight_attrs), list(activation_attrs), quantize_output)
        self.weight_quantizer = DepthwiseKernelQuantizer()


# Layers that move values around without changing their range: in TFLite the int8 op has one scale for
# input and output, so the QAT model must not put a separate fake-quant on their output.
_SAME_SCALE_LAYERS = (ResizeBilinear, keras.layers.Dropout)


def custom_objects() -> dict:
    """Everything needed to deserialize a QAT DeepLab model (use inside :func:`quantize_scope`)."""
    return {
        **CUSTOM_OBJECTS,
        "NoOpQuantizeConfig": NoOpQuantizeConfig,
        "OutputQuantizeConfig": OutputQuantizeConfig,
        "DepthwiseConvQuantizeConfig": DepthwiseConvQuantizeConfig,
        "DepthwiseKernelQuantizer": DepthwiseKernelQuantizer,
    }


def quantize_scope():
    """``tfmot.quantization.keras.quantize_scope`` with our custom layers and configs (for load_model)."""
    return _qk.quantize_scope(custom_objects())


# --------------------------------------------------------------------------------------------------------
# Integer-friendly float model.


def _is_global_average_pool(layer) -> bool:
    if not isinstance(layer, keras.layers.AveragePooling2D):
        return False
    spatial = tuple(layer.input_shape[1:3])
    return tuple(layer.pool_size) == spatial and layer.padding == "valid"


def prepare_for_int8(float_model: keras.Model) -> keras.Model:
    """Clone of ``float_model`` with the same outputs whose int8 TFLite graph is one XNNPACK partition.

    Rewrites (same layer names, same float results, weights copied):
    ``Rescaling`` -> frozen 1x1 ``DepthwiseConv2D`` (one int8 op instead of MUL+ADD with a float middle);
    whole-map ``AveragePooling2D`` -> ``GlobalAveragePooling2D(keepdims=True)`` (MEAN: int8 in XNNPACK,
    AVERAGE_POOL_2D is not).
    """
    normalize_weights = {}

    def replace(layer):
        if isinstance(layer, keras.layers.Rescaling):
            channels = layer.input_shape[-1]
            kernel = np.broadcast_to(np.float32(layer.scale), (channels,)).reshape(1, 1, channels, 1)
            bias = np.broadcast_to(np.float32(layer.offset), (channels,))
            normalize_weights[layer.name] = [kernel.copy(), bias.copy()]
            return keras.layers.DepthwiseConv2D(1, use_bias=True, trainable=False, name=layer.name)
        if _is_global_average_pool(layer):
            return keras.layers.GlobalAveragePooling2D(keepdims=True, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    with keras.utils.custom_object_scope(CUSTOM_OBJECTS):
        clone = keras.models.clone_model(float_model, clone_function=replace)
    for layer in clone.layers:
        if layer.name in normalize_weights:
            layer.set_weights(normalize_weights[layer.name])
        elif layer.weights:
            layer.set_weights(float_model.get_layer(layer.name).get_weights())
    return clone


# --------------------------------------------------------------------------------------------------------
# QAT model.


def _inbound_layers(layer) -> list:
    return [] if not layer._inbound_nodes else list(tf.nest.flatten(layer._inbound_nodes[0].inbound_layers))


def _consumers(layer) -> list:
    return [node.outbound_layer for node in layer._outbound_nodes]


def _concat_input_producers(model: keras.Model) -> list[str]:
    """Names of the weightless layers whose output reaches a Concatenate only through same-scale layers.

    Their outputs live on the concat's scale in TFLite, so they must not have fake-quant ranges of their
    own (that would force a requantization in front of the CONCATENATION)."""
    names = []
    for concat in model.layers:
        if not isinstance(concat, keras.layers.Concatenate):
            continue
        for layer in _inbound_layers(concat):
            while isinstance(layer, _SAME_SCALE_LAYERS) and len(_consumers(layer)) == 1:
                layer = _inbound_layers(layer)[0]
            if len(_consumers(layer)) == 1 and not layer.weights and not isinstance(layer, keras.layers.InputLayer):
                names.append(layer.name)
    return names


class _DeepLabLayoutTransform(_default_8bit.Default8BitQuantizeLayoutTransform):
    """tfmot's default layout transforms (Conv/DepthwiseConv + BN (+ReLU) folding patterns, input quantize,
    concat handling), then: producers feeding a Concatenate through resizes keep the concat's scale."""

    def apply(self, model, layer_quantize_map):
        transformed, layer_quantize_map = super().apply(model, layer_quantize_map)
        for name in _concat_input_producers(transformed):
            layer_quantize_map[name] = {"quantize_config": NoOpQuantizeConfig()}
        return transformed, layer_quantize_map


class _DeepLabQuantizeRegistry(_default_8bit.Default8BitQuantizeRegistry):
    """The default 8-bit registry with per-channel depthwise kernels (see DepthwiseKernelQuantizer).

    Overriding the registry (rather than annotating DepthwiseConv2D layers with a custom config) keeps
    tfmot's Conv+BN(+ReLU) transforms working: they skip any layer that carries a custom config."""

    def __init__(self):
        super().__init__()
        self._layer_quantize_map[keras.layers.DepthwiseConv2D] = DepthwiseConvQuantizeConfig()


class _DeepLabQuantizeScheme(_default_8bit.Default8BitQuantizeScheme):
    def get_layout_transformer(self):
        return _DeepLabLayoutTransform()

    def get_quantize_registry(self):
        return _DeepLabQuantizeRegistry()


def _annotate(layer):
    """Mark every layer for quantization; layers outside the default registry get an explicit config."""
    if isinstance(layer, keras.layers.InputLayer):
        return layer
    config = None
    if isinstance(layer, _SAME_SCALE_LAYERS):
        config = NoOpQuantizeConfig()
    return _qk.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()), config)


def quantize_model(float_model: keras.Model) -> keras.Model:
    """QAT model of a float DeepLab model: fake quantization where TFLite int8 quantizes, weights copied.

    The model is first rewritten by :func:`prepare_for_int8`. Conv2D/DepthwiseConv2D + BatchNormalization
    (+ ReLU) keep tfmot's default pattern (no fake quant between conv, BN and ReLU; weights per channel),
    so the converter folds BN and fuses ReLU/ReLU6 into the conv. Fake-quant ranges start at tfmot's
    [-6, 6]: call :func:`calibrate_activation_ranges` before training or converting.
    """
    prepared = prepare_for_int8(float_model)
    with quantize_scope():
        annotated = keras.models.clone_model(prepared, clone_function=_annotate)
        annotated.set_weights(prepared.get_weights())
        qat = _qk.quantize_apply(annotated, scheme=_DeepLabQuantizeScheme())
    return qat


# --------------------------------------------------------------------------------------------------------
# Range calibration.


@contextlib.contextmanager
def _observing_quantizers(observed: dict):
    """While open, activation quantizers record the range of what they see and let it through unquantized,
    and weight quantizers take their range from the current weights (what a training step would do)."""
    moving_call = _quantizers.MovingAverageQuantizer.__call__
    all_values_call = _quantizers.AllValuesQuantizer.__call__
    last_value_call = _quantizers.LastValueQuantizer.__call__

    def observe(self, inputs, training, weights, **kwargs):
        entry = observed.setdefault(id(weights["min_var"]), {"vars": weights, "mins": [], "maxs": [], "kind": type(self)})
        entry["mins"].append(float(tf.reduce_min(inputs)))
        entry["maxs"].append(float(tf.reduce_max(inputs)))
        return inputs

    def weights_from_last_value(self, inputs, training, weights, **kwargs):
        return last_value_call(self, inputs, True, weights, **kwargs)

    _quantizers.MovingAverageQuantizer.__call__ = observe
    _quantizers.AllValuesQuantizer.__call__ = observe
    _quantizers.LastValueQuantizer.__call__ = weights_from_last_value
    try:
        yield
    finally:
        _quantizers.MovingAverageQuantizer.__call__ = moving_call
        _quantizers.AllValuesQuantizer.__call__ = all_values_call
        _quantizers.LastValueQuantizer.__call__ = last_value_call


def calibrate_activation_ranges(qat_model: keras.Model, batches: Iterable) -> dict[str, tuple[float, float]]:
    """Set every fake-quant range of ``qat_model`` from float activations on ``batches`` (images 0..255).

    tfmot's moving-average ranges start at [-6, 6] and move 0.1% per training step, so a freshly quantized
    model (QAT fine-tuning, or delayed QAT switching on at ``delay_steps``) would clip or waste most of
    its 8 bits for thousands of steps. Here each batch runs in inference mode (BN moving statistics,
    no dropout) with fake quantization off; activation ranges become the mean over batches of the batch
    min/max (the value the 0.999 EMA converges to), the input's range the overall min/max (tfmot's
    AllValuesQuantizer), and weight ranges the current weights' per-channel min/max. Returns
    ``{variable name: (min, max)}`` of the activation ranges.
    """
    observed: dict = {}
    with _observing_quantizers(observed):
        for batch in batches:
            qat_model(tf.convert_to_tensor(batch, tf.float32), training=False)
    if not observed:
        raise ValueError("no batches given, or the model has no activation quantizers")
    ranges = {}
    for entry in observed.values():
        if entry["kind"] is _quantizers.AllValuesQuantizer:
            low, high = min(entry["mins"]), max(entry["maxs"])
        else:
            low, high = float(np.mean(entry["mins"])), float(np.mean(entry["maxs"]))
        # TFLite needs 0 inside every range (zero padding and ReLU zeros must be exact).
        low, high = min(low, 0.0), max(high, 0.0)
        if high - low < 1e-6:
            high = low + 1e-6
        entry["vars"]["min_var"].assign(tf.fill(entry["vars"]["min_var"].shape, low))
        entry["vars"]["max_var"].assign(tf.fill(entry["vars"]["max_var"].shape, high))
        ranges[entry["vars"]["min_var"].name] = (low, high)
    return ranges


# --------------------------------------------------------------------------------------------------------
# Batch-norm statistics.


def reestimate_batch_norm(model: keras.Model, images) -> None:
    """Set every BN layer's moving mean/variance to the statistics of ``images`` (one batch, 0..255).

    One training-mode forward pass with momentum 0: each BN normalizes with, and stores, the batch
    statistics of its input as produced by the already re-estimated layers before it, so inference
    afterwards reproduces the pass. Useful to give randomly initialised models realistic activation
    scales (tests, benchmarks) or to refresh statistics after fine-tuning.
    """
    batch_norms = [layer for layer in model.submodules if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in batch_norms]
    trainable = [layer.trainable for layer in batch_norms]
    try:
        for layer in batch_norms:
            layer.momentum, layer.trainable = 0.0, True
        model(tf.convert_to_tensor(images, tf.float32), training=True)
    finally:
        for layer, momentum, was_trainable in zip(batch_norms, momenta, trainable, strict=True):
            layer.momentum, layer.trainable = momentum, was_trainable


# --------------------------------------------------------------------------------------------------------
# Batch-norm freezing.


def freeze_batch_norm(model: keras.Model) -> int:
    """Freeze the statistics (and scale/offset) of every BatchNormalization layer, wrapped or not.

    In tf_keras, ``trainable = False`` on a BatchNormalization layer makes it run in inference mode even
    when called with ``training=True``: it normalizes with, and stops updating, its moving mean/variance
    (MLPerf's freeze_bn_delay = quant_delay: small QAT batches would otherwise ruin the statistics the
    folded int8 weights are built from). Inside a tfmot QuantizeWrapper the BN layer is ``wrapper.layer``;
    the wrapper itself stays trainable so its quantizer variables keep updating. Recompile the model
    (or rebuild the train step) afterwards, since Keras caches trainable variables. Returns the number
    of BN layers frozen.
    """
    frozen = 0
    for layer in model.submodules:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            frozen += 1
    return frozen


# --------------------------------------------------------------------------------------------------------
# TFLite export.

_INPUT_TYPES = {"uint8": tf.uint8, "float32": tf.float32}
_OUTPUTS = ("labels", "logits")


def _serving_function(model: keras.Model, output: str):
    """Concrete function image -> logits or labels, traced with native dilated depthwise convolutions.

    ``labels`` puts ArgMax inside the graph (int32: TFLite's ARG_MAX writes int32 directly; a uint8 label
    map would need an extra CAST pass over the full-resolution output)."""
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


def _converter(model: keras.Model, output: str) -> tf.lite.TFLiteConverter:
    converter = tf.lite.TFLiteConverter.from_concrete_functions([_serving_function(model, output)], model)
    # By default the converter first writes the whole Keras model as a SavedModel, re-tracing every
    # layer for serialization: 1-2 minutes for a tfmot model. Freezing the concrete function directly
    # gives the same graph in seconds.
    converter.experimental_lower_to_saved_model = False
    return converter


def _integer_io(converter, input_type: str, output: str) -> None:
    if input_type not in _INPUT_TYPES:
        raise ValueError(f"input_type must be one of {tuple(_INPUT_TYPES)}, got {input_type!r}")
    converter.inference_input_type = _INPUT_TYPES[input_type]
    if output == "logits":
        # uint8 in -> int8 logits out (no DEQUANTIZE); float in -> float logits out.
        converter.inference_output_type = tf.int8 if input_type == "uint8" else tf.float32


def float_tflite(float_model: keras.Model, *, output: str = "labels") -> bytes:
    """Float32 TFLite of the float model (float 0..255 input), the baseline int8 files are compared with."""
    return _converter(float_model, output).convert()


def qat_to_tflite(qat_model: keras.Model, *, input_type: str = "uint8", output: str = "labels") -> bytes:
    """Integer-only TFLite of a (calibrated/trained) QAT model.

    ``input_type="uint8"``: raw 0..255 pixels (scale 1, zero point 0; the model normalizes inside).
    ``output="labels"``: int32 class map (ArgMax in the graph); ``"logits"``: int8 logits (uint8 input)
    or float32 logits (float32 input).
    """
    converter = _converter(qat_model, output)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    _integer_io(converter, input_type, output)
    return converter.convert()


def ptq_int8_tflite(
    float_model: keras.Model,
    representative_images: Iterable,
    *,
    per_channel: bool = True,
    input_type: str = "uint8",
    output: str = "labels",
) -> bytes:
    """Full-integer post-training quantized TFLite (MLPerf PTQ: ~500 calibration images, 0..255 floats).

    ``per_channel=False`` quantizes every weight tensor with one scale (smaller file, as the seeds'
    751 KB / 2.2 MB models), via the converter's ``_experimental_disable_per_channel``.
    """
    prepared = prepare_for_int8(float_model)
    images = list(representative_images)

    def representative_dataset():
        for image in images:
            image = np.asarray(image, np.float32)
            yield [image[None] if image.ndim == 3 else image]

    converter = _converter(prepared, output)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_disable_per_channel = not per_channel
    _integer_io(converter, input_type, output)
    return converter.convert()


# --------------------------------------------------------------------------------------------------------
# Inspection of TFLite files.


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _read_model(tflite_bytes: bytes):
    schema = _schema()
    return schema.ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)


def _op_names(model) -> list[str]:
    schema = _schema()
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    return [names[codes[op.opcodeIndex]] for op in model.subgraphs[0].operators]


def op_histogram(tflite_bytes: bytes) -> dict[str, int]:
    """``{builtin op name: count}`` of the main subgraph, e.g. ``{"CONV_2D": 38, ...}``."""
    counts: dict[str, int] = {}
    for name in _op_names(_read_model(tflite_bytes)):
        counts[name] = counts.get(name, 0) + 1
    return counts


def tensor_types(tflite_bytes: bytes) -> list[tuple[str, str, str]]:
    """``(op name, tensor name, dtype name)`` for every non-constant tensor an operator produces."""
    schema = _schema()
    type_names = {value: name for name, value in vars(schema.TensorType).items() if not name.startswith("_")}
    model = _read_model(tflite_bytes)
    graph = model.subgraphs[0]
    rows = []
    for op, op_name in zip(graph.operators, _op_names(model), strict=True):
        for index in op.outputs:
            tensor = graph.tensors[index]
            rows.append((op_name, tensor.name.decode(), type_names[tensor.type]))
    return rows


def _interpreter(tflite_bytes: bytes, num_threads: int):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite_bytes, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def _delegation(interpreter) -> tuple[int, list[str]]:
    """(number of XNNPACK partitions, names of the original ops XNNPACK did not take).

    After ``allocate_tensors`` the interpreter lists the model's nodes followed by one DELEGATE node per
    partition. A partition's original nodes are found by walking back from the DELEGATE node's outputs
    to its inputs; every original node not reached that way runs on the TFLite kernels."""
    native = interpreter._interpreter
    count = native.NumNodes()
    names = [native.NodeName(i) for i in range(count)]
    producer = {int(t): i for i in range(count) if names[i] != "DELEGATE" for t in native.NodeOutputs(i)}
    delegated = set()
    for node in range(count):
        if names[node] != "DELEGATE":
            continue
        boundary = {int(t) for t in native.NodeInputs(node)}
        pending = [int(t) for t in native.NodeOutputs(node)]
        seen = set()
        while pending:
            tensor = pending.pop()
            if tensor in seen or tensor in boundary or tensor not in producer:
                continue
            seen.add(tensor)
            delegated.add(producer[tensor])
            pending.extend(int(t) for t in native.NodeInputs(producer[tensor]))
    partitions = names.count("DELEGATE")
    undelegated = [names[i] for i in range(count) if names[i] != "DELEGATE" and i not in delegated]
    return partitions, undelegated


def xnnpack_partitions(tflite_bytes: bytes, num_threads: int = 1) -> int:
    """Number of XNNPACK partitions (DELEGATE nodes) LiteRT's default delegate makes of the model."""
    return _delegation(_interpreter(tflite_bytes, num_threads))[0]


def undelegated_ops(tflite_bytes: bytes, num_threads: int = 1) -> list[str]:
    """Ops (in graph order) that XNNPACK did not take and that run on TFLite's own kernels."""
    return _delegation(_interpreter(tflite_bytes, num_threads))[1]


def run_tflite(tflite_bytes: bytes, images: np.ndarray, num_threads: int = 1) -> np.ndarray:
    """Run a single-image TFLite model on each of ``images`` (N, H, W, 3 in 0..255); stacked outputs."""
    interpreter = _interpreter(tflite_bytes, num_threads)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for image in np.asarray(images):
        value = np.clip(np.round(image), 0, 255) if inp["dtype"] == np.uint8 else image
        interpreter.set_tensor(inp["index"], value[None].astype(inp["dtype"]))
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(results)


__all__ = [
    "NoOpQuantizeConfig",
    "OutputQuantizeConfig",
    "calibrate_activation_ranges",
    "custom_objects",
    "float_tflite",
    "freeze_batch_norm",
    "op_histogram",
    "prepare_for_int8",
    "ptq_int8_tflite",
    "qat_to_tflite",
    "quantize_model",
    "quantize_scope",
    "reestimate_batch_norm",
    "run_tflite",
    "tensor_types",
    "undelegated_ops",
    "xnnpack_partitions",
]

