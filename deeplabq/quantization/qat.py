"""QAT configs: the tfmot QuantizeConfigs and quantizers of DeepLab's layers (no-op and output-only configs, the
truly per-channel depthwise kernel quantizer), the range-following activation quantizer with the warm-up of its
EMA decay (:class:`RangeFollowingQuantizer`, :func:`set_range_updates`), the integer-friendly rebuild of the float
model (:func:`prepare_for_int8`) and the QAT model itself (:func:`quantize_model`, with its tfmot layout
transform, registry and scheme). The bottom of the package: it imports no other quantization module.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras import quant_ops as _quant_ops
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer as _quantize_layer
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as _registry,
)

# (Importing deeplabq.quantization runs deeplabq/__init__ first: TF_USE_LEGACY_KERAS is set before TF loads.)
from deeplabq.model import CUSTOM_OBJECTS, ResizeBilinear

_qk = tfmot.quantization.keras
_quantizers = _qk.quantizers
_default_8bit = _qk.default_8bit


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
