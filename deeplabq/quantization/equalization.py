"""Corrections of the float Keras model before post-training quantization (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019; AIMET's CLE and empirical bias correction).

* :func:`equalize_depthwise_pointwise` -- cross-layer equalization of each depthwise -> pointwise pair of
  MobileNetV2 (``block_N_depthwise`` -> BN -> ReLU6 -> ``block_N_project``). The BN-folded depthwise kernel of
  channel ``i`` (what TFLite quantizes) has range ``r1_i``, the pointwise kernel's input channel ``i`` has
  ``r2_i``; dividing the depthwise channel by ``s_i = sqrt(r1_i / r2_i)`` (through BN's gamma and beta) and
  multiplying the pointwise input channel by it gives both the range ``sqrt(r1_i r2_i)``, so one per-tensor
  scale fits every channel. ReLU is scale-equivariant, ReLU6 is not: ``ReLU6(z / s) = ReLU6(z) / s`` holds only
  while ``z / s`` and ``z`` stay under 6. So a channel whose pre-activation reaches ``6 / margin`` on the
  calibration images keeps ``s_i = 1``, and any other gets ``s_i >= margin * max(z_i) / 6``: on those images the
  float function is unchanged (up to float rounding), and elsewhere within the margin.
* :func:`correct_bias` -- empirical bias correction: for each conv, the mean shift its int8 weights cause in its
  output, ``E[conv(x, Q(W) - W)]`` over the calibration images (``x`` the float model's input of that layer,
  ``W`` the BN-folded kernel, ``Q`` TFLite's symmetric int8 weight quantization, per channel or per tensor), is
  subtracted from its BN beta (or its bias). The float model then has a small offset that the int8 weights
  cancel on average.

Both return a new model (the given one is untouched), with the same layers and names.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

RELU6 = 6.0
WEIGHT_LEVELS = 127  # TFLite int8 weights: symmetric, -127..127


def clone(model: keras.Model) -> keras.Model:
    """A functional copy of ``model`` with its weights (new layer objects, same names)."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def _consumers(layer) -> list:
    return [node.outbound_layer for node in layer._outbound_nodes]


def _only_consumer(layer, kind):
    consumers = _consumers(layer)
    return consumers[0] if len(consumers) == 1 and isinstance(consumers[0], kind) else None


def _is_relu6(layer) -> bool:
    return isinstance(layer, keras.layers.ReLU) and layer.max_value is not None and float(layer.max_value) == RELU6 \
        and float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0


def _is_relu(layer) -> bool:
    return isinstance(layer, keras.layers.ReLU) and layer.max_value is None and float(layer.negative_slope) == 0.0 \
        and float(layer.threshold) == 0.0


def depthwise_pointwise_pairs(model: keras.Model) -> list[tuple]:
    """``(depthwise, batch norm, relu, pointwise)`` layer chains, each layer feeding only the next."""
    pairs = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.DepthwiseConv2D) or int(layer.depth_multiplier) != 1:
            continue
        bn = _only_consumer(layer, keras.layers.BatchNormalization)
        relu = bn and _only_consumer(bn, keras.layers.ReLU)
        pointwise = relu and _only_consumer(relu, keras.layers.Conv2D)
        if (pointwise is not None and (_is_relu6(relu) or _is_relu(relu)) and tuple(pointwise.kernel_size) == (1, 1)
                and int(getattr(pointwise, "groups", 1)) == 1 and bn.center and bn.scale):
            pairs.append((layer, bn, relu, pointwise))
    return pairs


def _bn_factor(bn) -> np.ndarray:
    """gamma / sqrt(variance + eps): what the converter folds into the conv before it."""
    return bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)


def _following_bn(layer):
    bn = _only_consumer(layer, keras.layers.BatchNormalization)
    return bn if bn is not None and bn.center and bn.scale else None


def _pre_activation_max(model: keras.Model, bns: list, images, batch_size: int) -> list[np.ndarray]:
    """Per channel, the largest output of each BN layer over ``images``."""
    probe = keras.Model(model.inputs, [bn.output for bn in bns])
    highest = [np.full(int(bn.gamma.shape[0]), -np.inf) for bn in bns]
    for start in range(0, len(images), batch_size):
        outputs = probe(np.stack(images[start:start + batch_size]).astype(np.float32), training=False)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        for k, output in enumerate(outputs):
            highest[k] = np.maximum(highest[k], tf.reduce_max(output, axis=(0, 1, 2)).numpy())
    return highest


def equalize_depthwise_pointwise(model: keras.Model, images, *, margin: float = 1.25, max_scale: float = 16.0,
                                 batch_size: int = 8) -> tuple[keras.Model, list[dict]]:
    """Cross-layer equalization of every depthwise -> pointwise pair (module docstring); returns the new model
    and one record per pair (``layer``, ``channels``, ``kept`` (channels left at s = 1), ``spread_before``,
    ``spread_after``: the ratio of the largest to the median channel range of the folded depthwise kernel)."""
    model = clone(model)
    pairs = depthwise_pointwise_pairs(model)
    if not pairs:
        return model, []
    images = [np.asarray(image, np.float32) for image in images]
    highest = _pre_activation_max(model, [bn for _, bn, _, _ in pairs], images, batch_size)
    records = []
    for (depthwise, bn, relu, pointwise), z_max in zip(pairs, highest, strict=True):
        folded = depthwise.depthwise_kernel.numpy()[:, :, :, 0] * _bn_factor(bn)
        r1 = np.max(np.abs(folded), axis=(0, 1))
        pw_bn = _following_bn(pointwise)
        pw = pointwise.kernel.numpy() * (_bn_factor(pw_bn) if pw_bn is not None else 1.0)
        r2 = np.max(np.abs(pw), axis=(0, 1, 3))
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.sqrt(r1 / r2)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        scale = np.clip(scale, 1 / max_scale, max_scale)
        if _is_relu6(relu):
            limit = RELU6 / margin
            saturating = z_max > limit
            scale = np.where(saturating, 1.0, np.maximum(scale, np.maximum(z_max, 0) / limit))
        else:
            saturating = np.zeros_like(scale, bool)
        bn.gamma.assign(bn.gamma.numpy() / scale)
        bn.beta.assign(bn.beta.numpy() / scale)
        pointwise.kernel.assign(pointwise.kernel.numpy() * scale[None, None, :, None])
        after = r1 / scale
        records.append({"layer": depthwise.name, "channels": int(scale.size), "kept": int(np.sum(scale == 1.0)),
                        "saturating": int(np.sum(saturating)),
                        "spread_before": float(np.max(r1) / max(np.median(r1), 1e-12)),
                        "spread_after": float(np.max(after) / max(np.median(after), 1e-12))})
    return model, records


def quantize_weights(folded: np.ndarray, *, per_channel: bool) -> np.ndarray:
    """TFLite's int8 weight quantization of a folded kernel (last axis: output channels), dequantized."""
    axes = tuple(range(folded.ndim - 1))
    largest = np.max(np.abs(folded), axis=axes, keepdims=True) if per_channel else np.max(np.abs(folded))
    step = np.where(largest > 0, largest / WEIGHT_LEVELS, 1.0)
    return np.clip(np.round(folded / step), -WEIGHT_LEVELS, WEIGHT_LEVELS) * step


def _conv_targets(model: keras.Model) -> list[tuple]:
    """``(conv, bn or None)`` for every Conv2D / DepthwiseConv2D whose output offset can be corrected: followed by
    a batch norm (its beta), or with a bias of its own."""
    targets = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D | keras.layers.DepthwiseConv2D):
            bn = _following_bn(layer)
            if bn is not None or layer.use_bias:
                targets.append((layer, bn))
    return targets


def _kernel_error(layer, bn, per_channel: bool) -> np.ndarray:
    """Q(W) - W of the BN-folded kernel, in the output's units (output channels on the last axis)."""
    depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
    kernel = layer.depthwise_kernel.numpy()[:, :, :, 0] if depthwise else layer.kernel.numpy()
    factor = _bn_factor(bn) if bn is not None else 1.0
    folded = kernel * factor
    error = quantize_weights(folded, per_channel=per_channel) - folded
    return error[:, :, :, None] if depthwise else error


def _with_quantized_weights(model: keras.Model, targets: list[tuple], per_channel: bool) -> keras.Model:
    """A copy of ``model`` whose conv kernels are their int8 values (TFLite's quantization of the BN-folded
    kernel, unfolded again): the float model as its int8 weights make it, activations still float."""
    quantized = clone(model)
    for layer, bn in targets:
        layer = quantized.get_layer(layer.name)
        factor = _bn_factor(quantized.get_layer(bn.name)) if bn is not None else 1.0
        error = _kernel_error(layer, quantized.get_layer(bn.name) if bn is not None else None, per_channel)
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.depthwise_kernel.assign(layer.depthwise_kernel.numpy() + error / np.reshape(factor, (1, 1, -1, 1)))
        else:
            layer.kernel.assign(layer.kernel.numpy() + error / factor)
    return quantized


def _output_of(model: keras.Model, layer, bn):
    return (model.get_layer(bn.name) if bn is not None else model.get_layer(layer.name)).output


def _channel_means(model: keras.Model, outputs: list, images, batch_size: int) -> list[np.ndarray]:
    """Per channel, the mean of each of ``outputs`` (tensors of ``model``) over ``images`` and their pixels."""
    probe = keras.Model(model.inputs, outputs)
    sums, counts = [0.0] * len(outputs), [0] * len(outputs)
    for start in range(0, len(images), batch_size):
        values = probe(np.stack(images[start:start + batch_size]), training=False)
        values = values if isinstance(values, list | tuple) else [values]
        for k, value in enumerate(values):
            sums[k] = sums[k] + tf.reduce_sum(value, axis=(0, 1, 2)).numpy()
            counts[k] += int(np.prod(value.shape[:3]))
    return [np.asarray(total) / count for total, count in zip(sums, counts, strict=True)]


def correct_bias(model: keras.Model, images, *, per_channel: bool, float_layers=(),
                 batch_size: int = 8) -> tuple[keras.Model, int]:
    """Empirical bias correction (module docstring), layer by layer in graph order: each conv's mean output
    (after its BN) in the int8-weight model, whose earlier layers are already corrected, is brought back to the
    float model's, through its BN beta (or its bias). Layers named in ``float_layers`` stay float in the file:
    their weights are not quantized here and their bias is left alone (a correction of int8 weights they will
    not have would be an error of its own). Returns the new model and the number of layers corrected."""
    model = clone(model)
    targets = [(layer, bn) for layer, bn in _conv_targets(model) if layer.name not in set(float_layers)]
    if not targets:
        return model, 0
    images = [np.asarray(image, np.float32) for image in images]
    reference = _channel_means(model, [_output_of(model, layer, bn) for layer, bn in targets], images, batch_size)
    quantized = _with_quantized_weights(model, targets, per_channel)
    for (layer, bn), expected in zip(targets, reference, strict=True):
        shift = _channel_means(quantized, [_output_of(quantized, layer, bn)], images, batch_size)[0] - expected
        for copy in (model, quantized):
            if bn is not None:
                copy.get_layer(bn.name).beta.assign(copy.get_layer(bn.name).beta.numpy() - shift)
            else:
                copy.get_layer(layer.name).bias.assign(copy.get_layer(layer.name).bias.numpy() - shift)
    return model, len(targets)


def corrected_for_ptq(model: keras.Model, images, *, equalize: bool, bias_correction: bool,
                      per_channel: bool, float_layers=()) -> keras.Model:
    """``model`` with the corrections asked for, equalization first (bias correction measures the error of the
    equalized weights; ``float_layers``, kept float in the file, get none); ``model`` itself when neither is."""
    if equalize:
        model, _ = equalize_depthwise_pointwise(model, images)
    if bias_correction:
        model, _ = correct_bias(model, images, per_channel=per_channel, float_layers=float_layers)
    return model
