"""Calibration and batch norm: :func:`calibrate_activation_ranges` sets the fake-quant ranges of a QAT model from
its float activations on a few batches (the input pinned to :data:`PIXEL_RANGE`, weights from their current
values); :func:`freeze_batch_norm` freezes the BN statistics for QAT (and, on request, gamma/beta, also inside
tfmot wrappers); :func:`reestimate_batch_norm` sets the BN statistics of a float model from images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer as _quantize_layer

from deeplabq.quantization.qat import RangeFollowingQuantizer

_quantizers = tfmot.quantization.keras.quantizers

# The raw pixel range of the model input: a uint8 TFLite input with scale 1 and zero point 0.
PIXEL_RANGE = (0.0, 255.0)


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
