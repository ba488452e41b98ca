"""8-bit quantization of DeepLab: QAT model (tfmot), range calibration, BN freezing, integer TFLite export.

Goal: a TFLite file that LiteRT's XNNPACK delegate runs as ONE integer partition -- every tensor between
the uint8 input and the output is int8, no QUANTIZE/DEQUANTIZE inside. What stands in the way in the float
model of ``deeplabq.model``, and what is done about it (in a weight-preserving clone,
:func:`prepare_for_int8`, used by QAT and PTQ alike):

* ``Rescaling('normalize')`` lowers to MUL + ADD. QAT can only fake-quantize the layer's output (the ADD),
  so the MUL's output has no range and the converter leaves a float island around it. It is split into
  two Rescaling layers (``x * s``, then ``+ o``), each with its own output range: int8 MUL + ADD.
* The image-pooling ``AveragePooling2D`` over the whole map lowers to AVERAGE_POOL_2D, which XNNPACK
  delegates in float only: in int8 it runs on the TFLite kernel and cuts the graph into two XNNPACK
  partitions. ``GlobalAveragePooling2D(keepdims=True)`` is the same average and lowers to MEAN, which
  XNNPACK runs in int8.
* An int8 CONCATENATION needs every input on the output's scale, or the converter inserts requantizing
  ops. The layers feeding a concat (directly, or through resizes and dropout, which keep their input's
  scale) therefore get no fake quantization of their own: the concat's output range covers them all.

Layers the default 8-bit registry does not know get explicit QuantizeConfigs, as the TF Model Garden QAT
project does (official/projects/qat/vision/quantization/configs.py): ``ResizeBilinear`` and ``Dropout``
get a no-op config (an interpolation cannot leave its input's range, and TFLite's int8 RESIZE_BILINEAR has
one scale for input and output). DepthwiseConv2D kernels get a truly per-channel quantizer (see
:class:`DepthwiseKernelQuantizer`). Conv2D/DepthwiseConv2D + BatchNormalization (+ ReLU/ReLU6) keep
tfmot's default transforms: no fake quant between conv, BN and ReLU, so the converter folds BN into the
conv and fuses the ReLU.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter
from tensorflow.lite.python import convert as _lite_convert
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops as _quant_ops
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer as _quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as _registry,
)

# (Importing deeplabq.quantization runs deeplabq/__init__ first: TF_USE_LEGACY_KERAS is set before TF loads.)
from deeplabq.model import CUSTOM_OBJECTS, ResizeBilinear, native_dilated_convolutions

_qk = tfmot.quantization.keras
_quantizers = _qk.quantizers
_default_8bit = _qk.default_8bit

# The raw pixel range of the model input: a uint8 TFLite input with scale 1 and zero point 0.
PIXEL_RANGE = (0.0, 255.0)


# --------------------------------------------------------------------------------------------------------
# QuantizeConfigs and quantizers.


@keras.utils.register_keras_serializable(package="deeplabq")
class NoOpQuantizeConfig(_qk.QuantizeConfig):
    """No fake quantization: the output stays on its input's scale (resize, dropout, concat inputs)."""

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
    """Fake-quantize the output only (weightless layers whose output range differs from the input's)."""

    def get_output_quantizers(self, layer):
        return [_quantizers.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)]


@keras.utils.register_keras_serializable(package="deeplabq")
class DepthwiseKernelQuantizer(_quantizers.LastValueQuantizer):
    """Per-channel fake quantization of a depthwise kernel ``(kh, kw, channels, multiplier)``.

    tfmot's conv weight quantizer takes the LAST axis as channel axis. For a depthwise kernel that is the
    depth multiplier (1), so tfmot quantizes depthwise kernels per tensor
    (tensorflow/model-optimization#808) while TFLite quantizes the BN-folded DEPTHWISE_CONV_2D kernel per
    channel: the QAT model would train against another, coarser grid than the int8 model runs. Here the
    kernel is viewed as ``(kh, kw, 1, channels * multiplier)`` -- TFLite's depthwise layout -- and
    quantized per output channel; folding a per-channel BN scale into it later keeps it on the grid.
    """

    def __init__(self, **kwargs):
        super().__init__(num_bits=8, per_axis=True, symmetric=True, narrow_range=True)

    def build(self, tensor_shape, name, layer):
        channels = int(tensor_shape[-2]) * int(tensor_shape[-1])
        return {
            f"{end}_var": layer.add_weight(
                f"{name}_{end}", shape=(channels,), initializer=keras.initializers.Constant(init), trainable=False
            )
            for end, init in (("min", -6.0), ("max", 6.0))
        }

    def __call__(self, inputs, training, weights, **kwargs):
        kh, kw, channels, multiplier = inputs.shape
        per_channel = tf.reshape(inputs, (kh, kw, 1, channels * multiplier))
        return tf.reshape(super().__call__(per_channel, training, weights, **kwargs), inputs.shape)

    def get_config(self):
        return {}


@keras.utils.register_keras_serializable(package="deeplabq")
class DepthwiseConvQuantizeConfig(_registry.Default8BitConvQuantizeConfig):
    """tfmot's DepthwiseConv2D config (kernel + activation) with a truly per-channel kernel quantizer."""

    def __init__(self, weight_attrs=("depthwise_kernel",), activation_attrs=("activation",), quantize_output=False):
        super().__init__(list(weight_attrs), list(activation_attrs), quantize_output)
        self.weight_quantizer = DepthwiseKernelQuantizer()


# tfmot's EMA decay of activation ranges, reached after a warm-up (see RangeFollowingQuantizer).
RANGE_EMA_DECAY = 0.999


class RangeFollowingQuantizer(_quantizers.MovingAverageQuantizer):
    """tfmot's activation quantizer, with the EMA decay of its range warming up to 0.999.

    tfmot updates an activation range by ``range += (1 - 0.999) * (batch range - range)`` from the first
    training step on (``zero_debias=False``), so a range moves 0.1% per step and needs ~1000 steps to leave
    where it started (tensorflow/model-optimization#368, #863; TF1 contrib.quantize debiased this EMA). A
    network that is still learning -- QAT from scratch, or a short delay -- outgrows its ranges long before:
    values beyond a range are clipped and get no gradient (FakeQuantWithMinMaxVars), so the activations
    cannot grow past ranges set on the untrained network, and the ranges cannot follow activations that do
    not grow. With delay 0 on the synthetic default, the logits' range calibrated on the untrained network
    was [0, 1e-6] and had reached only +-0.3 after 300 steps: a flat softmax, loss 1.61 -> 1.38, one class.

    Here the decay after ``n`` updates is ``min(0.999, (1 + n) / (10 + n))`` (tf.train.ExponentialMovingAverage's
    ``num_updates`` warm-up): the range follows the batch ranges closely at first (0.1, 0.5 after 8 updates,
    0.91 after 90, 0.97 after 300) and settles to tfmot's 0.999 after ~9000 updates. ``n`` counts the
    training-mode calls of this quantizer, i.e. the QAT training steps; it is not a model weight, so
    checkpoints keep tfmot's variables (:func:`set_range_updates` restores it on resume).
    """

    def __init__(self, num_bits, per_axis, symmetric, narrow_range):
        super().__init__(num_bits, per_axis, symmetric, narrow_range)
        self.updates = tf.Variable(0.0, trainable=False, name="range_updates")

    def __call__(self, inputs, training, weights, **kwargs):
        if not training:
            return super().__call__(inputs, training, weights, **kwargs)
        decay = tf.minimum(RANGE_EMA_DECAY, (1.0 + self.updates) / (10.0 + self.updates))
        with tf.control_dependencies([self.updates.assign_add(1.0)]):
            return _quant_ops.MovingAvgQuantize(
                inputs, weights["min_var"], weights["max_var"], ema_decay=decay, is_training=True,
                num_bits=self.num_bits, per_channel=self.per_axis, symmetric=self.symmetric,
                narrow_range=self.narrow_range)


def _activation_quantizer_slots(qat_model: keras.Model):
    """``(owner, attribute or index, quantizer)`` of every activation/output quantizer of a QAT model."""
    for layer in qat_model.layers:
        for activation in getattr(layer, "_quantize_activations", []):  # QuantizeWrapperV2: fused activations
            yield activation, "quantizer", activation.quantizer
        outputs = getattr(layer, "_output_quantizers", None) or []  # QuantizeWrapperV2: output
        for index, quantizer in enumerate(outputs):
            yield outputs, index, quantizer
        if isinstance(layer, _quantize_layer.QuantizeLayer) and layer.quantizer is not None:  # model input
            yield layer, "quantizer", layer.quantizer


def follow_activation_ranges(qat_model: keras.Model) -> int:
    """Give every moving-average activation quantizer of ``qat_model`` the warm-up of RangeFollowingQuantizer.

    The quantizers are replaced in the built wrappers (tfmot creates them inside its default quantize
    configs); their range variables, hence weights and checkpoints, stay as they are. A model rebuilt from
    its config (``get_config``) gets tfmot's quantizers back, which only differ in training. Returns the
    number of quantizers replaced."""
    replaced = 0
    for owner, slot, quantizer in list(_activation_quantizer_slots(qat_model)):
        if type(quantizer) is _quantizers.MovingAverageQuantizer:
            following = RangeFollowingQuantizer(**quantizer.get_config())
            if isinstance(slot, int):
                owner[slot] = following
            else:
                setattr(owner, slot, following)
            replaced += 1
    return replaced


def set_range_updates(qat_model: keras.Model, updates: int) -> None:
    """Set the update count of every RangeFollowingQuantizer (the QAT steps trained so far, on resume)."""
    for _, _, quantizer in _activation_quantizer_slots(qat_model):
        if isinstance(quantizer, RangeFollowingQuantizer):
            quantizer.updates.assign(float(updates))


# Layers that only move values around: in TFLite their int8 op has one scale for input and output.
_SAME_SCALE_LAYERS = (ResizeBilinear, keras.layers.Dropout)


def custom_objects() -> dict:
    """Everything needed to deserialize a QAT DeepLab model (``quantize_scope`` includes it)."""
    return {
        **CUSTOM_OBJECTS,
        "NoOpQuantizeConfig": NoOpQuantizeConfig,
        "OutputQuantizeConfig": OutputQuantizeConfig,
        "DepthwiseKernelQuantizer": DepthwiseKernelQuantizer,
        "DepthwiseConvQuantizeConfig": DepthwiseConvQuantizeConfig,
    }


def quantize_scope():
    """``tfmot.quantization.keras.quantize_scope`` plus our layers and configs (for load_model/clone)."""
    return _qk.quantize_scope(custom_objects())


# --------------------------------------------------------------------------------------------------------
# Integer-friendly float model.


def _is_whole_map_average_pool(layer) -> bool:
    return (
        isinstance(layer, keras.layers.AveragePooling2D)
        and tuple(layer.pool_size) == tuple(layer.input_shape[1:3])
        and layer.padding == "valid"
    )


def prepare_for_int8(float_model: keras.Model) -> keras.Model:
    """Rebuild ``float_model`` (same weights, same float outputs) so its int8 graph is one XNNPACK partition.

    * ``Rescaling(s, o)`` -> ``Rescaling(s)`` named ``<name>_scale`` then ``Rescaling(1, o)`` named
      ``<name>``: the same MUL and ADD, but now the MUL's output is a layer output that QAT can give a
      range (int8 MUL and ADD run in XNNPACK; a single op such as a 1x1 depthwise conv is 10x slower there
      with 3 channels).
    * whole-map ``AveragePooling2D`` -> ``GlobalAveragePooling2D(keepdims=True)``: MEAN instead of
      AVERAGE_POOL_2D, which XNNPACK runs in float only.

    Done on the functional config, so every other layer, name and connection stays as it is. Idempotent.
    """
    config = float_model.get_config()
    layers = []
    for entry in config["layers"]:
        layer = float_model.get_layer(entry["name"])
        if isinstance(layer, keras.layers.Rescaling) and (layer.scale != 1.0 and layer.offset != 0.0):
            scale_name = f"{layer.name}_scale"
            layers.append(
                {
                    **entry,
                    "name": scale_name,
                    "config": {**entry["config"], "name": scale_name, "offset": 0.0},
                }
            )
            entry = {
                **entry,
                "config": {**entry["config"], "scale": 1.0},
                "inbound_nodes": [[[scale_name, 0, 0, {}]]],
            }
        elif _is_whole_map_average_pool(layer):
            entry = {
                **entry,
                "class_name": "GlobalAveragePooling2D",
                "config": {
                    "name": layer.name,
                    "trainable": layer.trainable,
                    "dtype": entry["config"]["dtype"],
                    "data_format": "channels_last",
                    "keepdims": True,
                },
            }
        layers.append(entry)
    with keras.utils.custom_object_scope(custom_objects()):
        prepared = keras.Model.from_config({**config, "layers": layers})
    for layer in prepared.layers:
        if layer.weights:
            layer.set_weights(float_model.get_layer(layer.name).get_weights())
    return prepared


# --------------------------------------------------------------------------------------------------------
# QAT model.


def _inbound_layers(layer) -> list:
    return list(tf.nest.flatten(layer._inbound_nodes[0].inbound_layers)) if layer._inbound_nodes else []


def _consumers(layer) -> list:
    return [node.outbound_layer for node in layer._outbound_nodes]


def _concat_input_producers(model: keras.Model) -> list[str]:
    """Weightless layers whose only output path reaches a Concatenate through same-scale layers.

    In TFLite their outputs are on the concat's scale, so they must not get fake-quant ranges of their
    own (those would force a requantization in front of the CONCATENATION)."""
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
    """tfmot's default transforms (input quantize, Conv/DepthwiseConv + BN (+ReLU) patterns, concat),
    then the concat inputs lose their own output quantizers (see _concat_input_producers)."""

    def apply(self, model, layer_quantize_map):
        transformed, layer_quantize_map = super().apply(model, layer_quantize_map)
        for name in _concat_input_producers(transformed):
            layer_quantize_map[name] = {"quantize_config": NoOpQuantizeConfig()}
        return transformed, layer_quantize_map


class _DeepLabQuantizeRegistry(_default_8bit.Default8BitQuantizeRegistry):
    """Default 8-bit registry with per-channel depthwise kernels. Overriding the registry, rather than
    annotating DepthwiseConv2D layers with a config, keeps tfmot's Conv+BN(+ReLU) transforms working:
    they skip every layer that carries a custom config."""

    def __init__(self):
        super().__init__()
        self._layer_quantize_map[keras.layers.DepthwiseConv2D] = DepthwiseConvQuantizeConfig()


class _DeepLabQuantizeScheme(_default_8bit.Default8BitQuantizeScheme):
    def get_layout_transformer(self):
        return _DeepLabLayoutTransform()

    def get_quantize_registry(self):
        return _DeepLabQuantizeRegistry()


def _freeze(wrapper) -> None:
    """``trainable = False`` for a layer, also when it sits in a tfmot QuantizeWrapper.

    QuantizeWrapperV2 copies its layer's trainable weights into its own trainable list when it is built,
    so ``layer.trainable = False`` alone leaves them in the model's trainable variables. Taking them out
    of that list (they stay in the layer's non-trainable weights) keeps the order of ``wrapper.weights``,
    hence of saved weights, unchanged."""
    layer = getattr(wrapper, "layer", wrapper)
    layer.trainable = False
    if layer is not wrapper:
        for weight in layer.weights:
            if any(weight is w for w in wrapper._trainable_weights):
                wrapper._trainable_weights.remove(weight)


def _annotate(layer):
    """Mark a layer for quantization. Registry layers get no config, so tfmot's transforms see them; the
    others get one. Every layer is annotated, so nothing stays float by accident."""
    config = None
    if isinstance(layer, _SAME_SCALE_LAYERS):
        config = NoOpQuantizeConfig()
    elif isinstance(layer, keras.layers.Rescaling):
        config = OutputQuantizeConfig()
    return _qk.quantize_annotate_layer(layer.__class__.from_config(layer.get_config()), config)


def quantize_model(float_model: keras.Model) -> keras.Model:
    """QAT model (tfmot fake quantization where TFLite int8 quantizes) of a float DeepLab model.

    The model is first rebuilt by :func:`prepare_for_int8`; weights and BN statistics are copied from
    ``float_model``, and layer ``x`` becomes wrapper ``quant_x``. The fake-quant ranges start at tfmot's
    [-6, 6] (activations) and unset weight ranges: call :func:`calibrate_activation_ranges` before
    training, evaluating or converting. In training, activation ranges follow the network with a warm-up
    of their EMA decay (:class:`RangeFollowingQuantizer`).
    """
    prepared = prepare_for_int8(float_model)
    with quantize_scope():
        annotated = keras.models.clone_model(prepared, clone_function=_annotate)
        annotated.set_weights(prepared.get_weights())
        qat_model = _qk.quantize_apply(annotated, scheme=_DeepLabQuantizeScheme())
    follow_activation_ranges(qat_model)
    return qat_model


# --------------------------------------------------------------------------------------------------------
# Range calibration.


@contextlib.contextmanager
def _observing_quantizers(observed: dict):
    """While open, activation quantizers record the range of what they see and pass it on unquantized,
    and weight quantizers set their range from the current weights (as a training step does)."""
    originals = {
        cls: cls.__call__
        for cls in (_quantizers.MovingAverageQuantizer, RangeFollowingQuantizer, _quantizers.AllValuesQuantizer,
                    _quantizers.LastValueQuantizer)
    }

    def observe(self, inputs, training, weights, **kwargs):
        entry = observed.setdefault(id(weights["min_var"]), {"vars": weights, "mins": [], "maxs": []})
        axes = None if weights["min_var"].shape.rank == 0 else list(range(inputs.shape.rank - 1))
        entry["mins"].append(tf.reduce_min(inputs, axis=axes).numpy())
        entry["maxs"].append(tf.reduce_max(inputs, axis=axes).numpy())
        return inputs

    def weights_from_last_value(self, inputs, training, weights, **kwargs):
        return originals[_quantizers.LastValueQuantizer](self, inputs, True, weights, **kwargs)

    _quantizers.MovingAverageQuantizer.__call__ = observe
    RangeFollowingQuantizer.__call__ = observe
    _quantizers.AllValuesQuantizer.__call__ = observe
    _quantizers.LastValueQuantizer.__call__ = weights_from_last_value
    try:
        yield
    finally:
        for cls, call in originals.items():
            cls.__call__ = call


def calibrate_activation_ranges(qat_model: keras.Model, batches: Iterable) -> dict[str, tuple[float, float]]:
    """Set the fake-quant ranges of ``qat_model`` from its float activations on ``batches`` (N,H,W,3 in 0..255).

    tfmot's moving-average ranges start at [-6, 6] and move 0.1% per training step (EMA decay 0.999), so
    a freshly quantized model -- QAT fine-tuning, or delayed QAT switching on at ``delay_steps`` -- would
    clip or waste most of its 8 bits for thousands of steps. Each batch runs eagerly in inference mode
    (BN moving statistics, no dropout) with fake quantization off. Activation ranges become the mean over
    batches of the batch min/max (what the EMA converges to), the input range is pinned to the pixel range
    [0, 255] (uint8 input with scale 1, zero point 0), and weight ranges are the current weights' (per
    channel) min/max. Returns ``{min variable name: (min, max)}`` of the activation ranges.
    """
    observed: dict = {}
    with _observing_quantizers(observed):
        for batch in batches:
            qat_model(tf.cast(batch, tf.float32), training=False)
    if not observed:
        raise ValueError("calibrate_activation_ranges needs at least one batch")
    input_ranges = {
        id(layer.quantizer_vars["min_var"])
        for layer in qat_model.layers
        if isinstance(layer, _quantize_layer.QuantizeLayer) and layer.quantizer is not None
    }
    ranges = {}
    for key, entry in observed.items():
        if key in input_ranges:
            low, high = np.float32(PIXEL_RANGE[0]), np.float32(PIXEL_RANGE[1])
        else:
            low, high = np.mean(entry["mins"], axis=0), np.mean(entry["maxs"], axis=0)
        # TFLite needs 0 exactly representable (zero padding, ReLU), so every range contains it.
        low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
        high = np.maximum(high, low + 1e-6)
        min_var, max_var = entry["vars"]["min_var"], entry["vars"]["max_var"]
        min_var.assign(np.broadcast_to(low, min_var.shape).astype(np.float32))
        max_var.assign(np.broadcast_to(high, max_var.shape).astype(np.float32))
        ranges[min_var.name] = (float(np.min(low)), float(np.max(high)))
    return ranges


# --------------------------------------------------------------------------------------------------------
# Batch-norm statistics.


def _batch_norm_layers(model: keras.Model) -> list[tuple]:
    """``(layer as in model.layers, BatchNormalization layer)`` pairs of a float or QAT model."""
    pairs = [(layer, getattr(layer, "layer", layer)) for layer in model.layers]
    return [(outer, inner) for outer, inner in pairs if isinstance(inner, keras.layers.BatchNormalization)]


def freeze_batch_norm(model: keras.Model, *, freeze_scale_offset: bool = False) -> int:
    """Freeze the moving mean/variance of every BatchNormalization layer (MLPerf: freeze_bn_delay = quant_delay).

    Frozen BN normalizes with its moving statistics in training steps too and stops updating them, so
    small QAT batches cannot disturb the statistics the folded int8 weights are made of.

    ``layer.trainable = False`` does exactly that in tf_keras: a non-trainable BN layer runs in inference
    mode whatever ``training`` says, also inside a tfmot QuantizeWrapper (which passes ``training`` on to
    ``layer.call``). What happens to gamma/beta differs: a QuantizeWrapperV2 copied them into its own
    trainable list when it was built, so in a QAT model they keep training -- TF1 contrib.quantize's
    freeze_bn_delay semantics -- unless ``freeze_scale_offset=True`` takes them out too; a plain (float)
    BN layer freezes them with its statistics.

    Re-trace the train step afterwards (Keras caches the trainable variables of a traced step) and call it
    again after rebuilding or reloading the model. Returns the number of BN layers frozen.
    """
    pairs = _batch_norm_layers(model)
    for outer, layer in pairs:
        if freeze_scale_offset:
            _freeze(outer)
        else:
            layer.trainable = False
    return len(pairs)


def reestimate_batch_norm(model: keras.Model, images) -> None:
    """Set every BN layer's moving mean/variance of a FLOAT model to the statistics of ``images`` (0..255).

    One training-mode forward pass with momentum 0: each BN normalizes with, and stores, the batch
    statistics of its input as produced by the already re-estimated layers before it, so inference then
    reproduces that pass. Gives randomly initialised models realistic activation scales (tests and
    benchmarks); also a way to refresh statistics after fine-tuning. (On a QAT model the pass would also
    move the fake-quant ranges.)
    """
    layers = [layer for _, layer in _batch_norm_layers(model)]
    saved = [(layer.momentum, layer.trainable) for layer in layers]
    try:
        for layer in layers:
            layer.momentum, layer.trainable = 0.0, True
        model(tf.cast(images, tf.float32), training=True)
    finally:
        for layer, (momentum, trainable) in zip(layers, saved, strict=True):
            layer.momentum, layer.trainable = momentum, trainable


# --------------------------------------------------------------------------------------------------------
# TFLite export.

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
                   output: str) -> tf.lite.TFLiteConverter:
    def representative_dataset():
        for image in images:
            yield [image if image.ndim == 4 else image[None]]

    converter = tflite_converter(prepare_for_int8(float_model), output)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
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
        raise ValueError(f"export.int8_float_layers: no op of layer(s) {unknown} in the int8 model; "
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
    import csv
    import io

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


# --------------------------------------------------------------------------------------------------------
# Inspection of TFLite files.


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _enum_names(enum_class) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


def _graph(tflite_bytes: bytes):
    """(model object, main subgraph, builtin op name of each operator)."""
    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)
    op_names = _enum_names(schema.BuiltinOperator)
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    graph = model.subgraphs[0]
    return model, graph, [op_names[codes[op.opcodeIndex]] for op in graph.operators]


def op_histogram(tflite_bytes: bytes) -> dict[str, int]:
    """``{builtin op name: count}`` of the main subgraph, e.g. ``{"CONV_2D": 38, ...}``."""
    counts: dict[str, int] = {}
    for name in _graph(tflite_bytes)[2]:
        counts[name] = counts.get(name, 0) + 1
    return counts


def tensor_types(tflite_bytes: bytes) -> list[tuple[str, str, str]]:
    """``(op name, output tensor name, dtype name)`` for every tensor an operator produces, in graph order."""
    type_names = _enum_names(_schema().TensorType)
    _, graph, op_names = _graph(tflite_bytes)
    return [
        (op_name, graph.tensors[index].name.decode(), type_names[graph.tensors[index].type])
        for op, op_name in zip(graph.operators, op_names, strict=True)
        for index in op.outputs
    ]


def weight_scales(tflite_bytes: bytes) -> dict[str, int]:
    """``{weight tensor name: number of quantization scales}`` for every CONV_2D/DEPTHWISE_CONV_2D kernel."""
    _, graph, op_names = _graph(tflite_bytes)
    counts = {}
    for op, op_name in zip(graph.operators, op_names, strict=True):
        if op_name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            kernel = graph.tensors[op.inputs[1]]
            scales = kernel.quantization.scale if kernel.quantization is not None else None
            counts[kernel.name.decode()] = 0 if scales is None else len(scales)
    return counts


def _interpreter(tflite_bytes: bytes, num_threads: int):
    interpreter = LiteRTInterpreter(model_content=tflite_bytes, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def _delegation(interpreter) -> tuple[int, list[str]]:
    """(number of XNNPACK partitions, names of the ops that stay on TFLite's own kernels).

    After ``allocate_tensors`` the interpreter lists the model's nodes, then one DELEGATE node per
    XNNPACK partition. A partition's original nodes are found by walking back from its DELEGATE node's
    output tensors to its input tensors; original nodes reached by no walk run outside XNNPACK."""
    native = interpreter._interpreter
    names = [native.NodeName(i) for i in range(native.NumNodes())]
    producer = {}
    for node, name in enumerate(names):
        if name != "DELEGATE":
            producer.update({int(tensor): node for tensor in native.NodeOutputs(node)})
    delegated = set()
    for node, name in enumerate(names):
        if name != "DELEGATE":
            continue
        boundary = {int(tensor) for tensor in native.NodeInputs(node)}
        pending = [int(tensor) for tensor in native.NodeOutputs(node)]
        while pending:
            tensor = pending.pop()
            if tensor in boundary or tensor not in producer or producer[tensor] in delegated:
                continue
            delegated.add(producer[tensor])
            pending.extend(int(t) for t in native.NodeInputs(producer[tensor]))
    undelegated = [name for node, name in enumerate(names) if name != "DELEGATE" and node not in delegated]
    return names.count("DELEGATE"), undelegated


def xnnpack_partitions(tflite_bytes: bytes, num_threads: int = 1) -> int:
    """Number of XNNPACK partitions (DELEGATE nodes) LiteRT's default delegate cuts the model into."""
    return _delegation(_interpreter(tflite_bytes, num_threads))[0]


def undelegated_ops(tflite_bytes: bytes, num_threads: int = 1) -> list[str]:
    """Ops (in graph order) that XNNPACK did not take: they run on TFLite's builtin kernels."""
    return _delegation(_interpreter(tflite_bytes, num_threads))[1]


def run_tflite(tflite_bytes: bytes, images, num_threads: int = 1) -> np.ndarray:
    """Outputs of a single-image TFLite model for each of ``images`` (N,H,W,3 in 0..255), stacked.

    Quantized outputs are returned as stored (int8 logits: see ``get_output_details()['quantization']``)."""
    interpreter = _interpreter(tflite_bytes, num_threads)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for image in np.asarray(images, np.float32):
        if inp["dtype"] == np.uint8:
            image = np.clip(np.round(image), 0, 255)
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(results)
