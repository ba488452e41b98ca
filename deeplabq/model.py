"""DeepLabv3 / DeepLabv3+ with a MobileNetV2 backbone, built from plain tf_keras layers.

The network is the one of research/deeplab (``model_variant=mobilenet_v2``): same channel widths, same
dilation schedule for the output stride, same head (image pooling + ``aspp0``, ``concat_projection``,
``logits/semantic``) and, for v3+, the same decoder. Backbone layers carry the names of
``keras.applications.MobileNetV2`` so its ImageNet weights load by name; head layers carry the TF1 scope
names (``/`` replaced by ``_``) so official checkpoints map one to one (see ``deeplabq.checkpoints``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

from deeplabq.errors import ConfigError

# (expansion, output channels at depth multiplier 1, stride) of MobileNetV2's 17 inverted-residual blocks.
MOBILENET_V2_BLOCKS = (
    (1, 16, 1),
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)
# The decoder of DeepLabv3+ reads the expanded, depthwise-filtered features of block 2 (stride 4).
DECODER_LOW_LEVEL_LAYER = "block_2_depthwise_relu"
VALID_OUTPUT_STRIDES = (8, 16, 32)
BACKBONE_BN_EPSILON = 1e-3  # slim MobileNetV2 and keras.applications
HEAD_BN_EPSILON = 1e-5  # research/deeplab model.py
HEAD_BN_MOMENTUM = 0.9997

_keras_depthwise_call = keras.layers.DepthwiseConv2D.call


def _native_depthwise_call(layer, inputs):
    rate = tuple(layer.dilation_rate)
    if rate == (1, 1):
        return _keras_depthwise_call(layer, inputs)
    outputs = tf.raw_ops.DepthwiseConv2dNative(
        input=inputs,
        filter=layer.depthwise_kernel,
        strides=(1, *layer.strides, 1),
        padding=layer.padding.upper(),
        dilations=(1, *rate, 1),
    )
    if layer.use_bias:
        outputs = tf.nn.bias_add(outputs, layer.bias)
    return outputs if layer.activation is None else layer.activation(outputs)


@contextlib.contextmanager
def native_dilated_convolutions():
    """Trace dilated depthwise convolutions as one native op (for TFLite export only).

    TensorFlow's CPU kernel cannot run a dilated DepthwiseConv2dNative, so Keras goes through
    space-to-batch, and the TFLite converter then keeps SPACE_TO_BATCH_ND / BATCH_TO_SPACE_ND around every
    dilated layer, which splits the XNNPACK graph. While this context is open, every
    ``keras.layers.DepthwiseConv2D`` (plain or inside a tfmot QuantizeWrapper) traces as the native op,
    which TFLite runs as one DEPTHWISE_CONV_2D with dilation factors. Graphs traced here are for the
    converter, not for execution on CPU.
    """
    keras.layers.DepthwiseConv2D.call = _native_depthwise_call
    try:
        yield
    finally:
        keras.layers.DepthwiseConv2D.call = _keras_depthwise_call


@keras.utils.register_keras_serializable(package="deeplabq")
class ResizeBilinear(keras.layers.Layer):
    """Bilinear resize to a fixed size with ``align_corners=True``, as research/deeplab resizes."""

    def __init__(self, size, align_corners: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.size = tuple(int(s) for s in size)
        self.align_corners = align_corners

    def call(self, inputs):
        return tf.compat.v1.image.resize_bilinear(inputs, self.size, align_corners=self.align_corners)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size, "align_corners": self.align_corners}


@dataclass(frozen=True)
class DeepLabSpec:
    """Everything that fixes the architecture (and so the weight shapes) of a DeepLab model."""

    num_classes: int
    crop_size: tuple[int, int]
    depth_multiplier: float = 1.0
    output_stride: int = 16
    divisible_by: int | None = None  # None: research/deeplab's rule (8 at dm 1.0, else 1)
    decoder_output_stride: int | None = None  # 4 for DeepLabv3+
    atrous_rates: tuple[int, ...] = ()
    aspp_channels: int = 256
    decoder_channels: int = 256
    dropout_rate: float = 0.1  # research/deeplab keeps 0.9 after concat_projection

    @property
    def channel_divisor(self) -> int:
        if self.divisible_by is not None:
            return int(self.divisible_by)
        return 8 if self.depth_multiplier == 1.0 else 1

    def validate(self) -> None:
        """Raise ValueError naming the config key of the first impossible value."""
        if self.depth_multiplier <= 0:
            raise ConfigError(f"backbone.depth_multiplier must be > 0, got {self.depth_multiplier}")
        if self.output_stride not in VALID_OUTPUT_STRIDES:
            raise ConfigError(
                f"backbone.output_stride must be one of {VALID_OUTPUT_STRIDES}, got {self.output_stride}"
            )
        if self.num_classes < 2:
            raise ConfigError(f"dataset.num_classes must be >= 2, got {self.num_classes}")
        if len(self.crop_size) != 2 or min(self.crop_size) < self.output_stride:
            raise ConfigError(
                f"dataset.crop_size {list(self.crop_size)} must be two sizes, each at least "
                f"backbone.output_stride={self.output_stride}"
            )
        if self.decoder_output_stride is not None and self.decoder_output_stride != 4:
            raise ConfigError(
                f"head.decoder_output_stride must be 4 (MobileNetV2's stride-4 features) or null, "
                f"got {self.decoder_output_stride}"
            )
        if self.divisible_by is not None and self.divisible_by not in (1, 8):
            raise ConfigError(f"backbone.divisible_by must be 1, 8 or null, got {self.divisible_by}")
        if any(r < 1 for r in self.atrous_rates):
            raise ConfigError(f"head.atrous_rates must be positive, got {list(self.atrous_rates)}")


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Channel rounding of slim's and Keras' MobileNetV2 (never more than 10% below ``value``)."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def feature_size(size: int, stride: int) -> int:
    """Spatial size after ``stride`` with SAME padding (the 'valid' size deeplab uses for odd crops)."""
    for _ in range(stride.bit_length() - 1):
        size = (size + 1) // 2
    return size


def _conv_bn_relu(x, filters, name, *, kernel=1, epsilon=HEAD_BN_EPSILON, relu6=False, bn_name=None):
    x = keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(
        epsilon=epsilon, momentum=HEAD_BN_MOMENTUM, name=bn_name or f"{name}_BN"
    )(x)
    return keras.layers.ReLU(6.0 if relu6 else None, name=f"{name}_relu")(x)


def _separable_conv_bn_relu(x, filters, name, rate=1):
    """research/deeplab's ``split_separable_conv2d``: depthwise+BN+ReLU, then pointwise+BN+ReLU."""
    x = keras.layers.DepthwiseConv2D(3, padding="same", dilation_rate=rate, use_bias=False, name=f"{name}_depthwise")(x)
    x = keras.layers.BatchNormalization(
        epsilon=HEAD_BN_EPSILON, momentum=HEAD_BN_MOMENTUM, name=f"{name}_depthwise_BN"
    )(x)
    x = keras.layers.ReLU(name=f"{name}_depthwise_relu")(x)
    return _conv_bn_relu(x, filters, f"{name}_pointwise")


def mobilenet_v2_backbone(x, spec: DeepLabSpec):
    """MobileNetV2 up to block 16 with dilation after ``output_stride``. Returns (features, layer outputs)."""
    divisor = spec.channel_divisor
    # research/deeplab: min_depth 8 at dm 1.0, else 1; keras.applications: never below the divisor (8).
    min_depth = 8 if spec.depth_multiplier == 1.0 or divisor == 8 else 1
    depth = lambda channels: make_divisible(channels * spec.depth_multiplier, divisor, min_value=min_depth)  # noqa: E731
    first_filters = depth(32)
    x = keras.layers.Conv2D(first_filters, 3, strides=2, padding="same", use_bias=False, name="Conv1")(x)
    x = keras.layers.BatchNormalization(epsilon=BACKBONE_BN_EPSILON, momentum=0.999, name="bn_Conv1")(x)
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)

    current_stride, rate, in_channels = 2, 1, first_filters
    taps = {}
    for index, (expansion, channels, stride) in enumerate(MOBILENET_V2_BLOCKS):
        # slim's rule: once the running stride reaches output_stride, stride becomes dilation.
        if current_stride == spec.output_stride and stride > 1:
            layer_stride, layer_rate, rate = 1, rate, rate * stride
        else:
            layer_stride, layer_rate = stride, rate
            current_stride *= stride
        prefix = "expanded_conv_" if index == 0 else f"block_{index}_"
        out_channels = depth(channels)
        shortcut = x
        if expansion != 1:
            # slim's expand_input_by_factor rounds to a multiple of 8 (a no-op whenever the input width is one,
            # as with keras.applications' rounding and research/deeplab at dm 1.0 and 0.5).
            expanded = make_divisible(in_channels * expansion, 8)
            x = keras.layers.Conv2D(expanded, 1, use_bias=False, name=f"{prefix}expand")(x)
            x = keras.layers.BatchNormalization(
                epsilon=BACKBONE_BN_EPSILON, momentum=0.999, name=f"{prefix}expand_BN"
            )(x)
            x = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)
        x = keras.layers.DepthwiseConv2D(
            3, strides=layer_stride, dilation_rate=layer_rate, padding="same", use_bias=False,
            name=f"{prefix}depthwise",
        )(x)
        x = keras.layers.BatchNormalization(
            epsilon=BACKBONE_BN_EPSILON, momentum=0.999, name=f"{prefix}depthwise_BN"
        )(x)
        x = keras.layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
        taps[f"{prefix}depthwise_relu"] = x
        x = keras.layers.Conv2D(out_channels, 1, use_bias=False, name=f"{prefix}project")(x)
        x = keras.layers.BatchNormalization(
            epsilon=BACKBONE_BN_EPSILON, momentum=0.999, name=f"{prefix}project_BN"
        )(x)
        if layer_stride == 1 and in_channels == out_channels:
            x = keras.layers.Add(name=f"{prefix}add")([shortcut, x])
        in_channels = out_channels
    return x, taps


def build_deeplab(spec: DeepLabSpec, name: str = "deeplab") -> keras.Model:
    """Float DeepLab model: float 0..255 RGB in (normalized inside), logits at input size out."""
    spec.validate()
    height, width = spec.crop_size
    inputs = keras.Input((height, width, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    features, taps = mobilenet_v2_backbone(x, spec)
    feat_hw = (feature_size(height, spec.output_stride), feature_size(width, spec.output_stride))

    # Image-level features: average over the whole map, 1x1 conv, back to the map size.
    pooled = keras.layers.AveragePooling2D(pool_size=feat_hw, name="image_pooling_avg")(features)
    pooled = _conv_bn_relu(pooled, spec.aspp_channels, "image_pooling")
    pooled = ResizeBilinear(feat_hw, name="image_pooling_resize")(pooled)
    branches = [pooled, _conv_bn_relu(features, spec.aspp_channels, "aspp0")]
    for i, rate in enumerate(spec.atrous_rates, start=1):
        branches.append(_separable_conv_bn_relu(features, spec.aspp_channels, f"aspp{i}", rate=rate))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = _conv_bn_relu(x, spec.aspp_channels, "concat_projection")
    # force_generator: masks come from a tf.random.Generator, whose state the trainer checkpoints (not the
    # model's weights), so a resumed run draws the masks the uninterrupted run would have.
    x = keras.layers.Dropout(spec.dropout_rate, name="concat_projection_dropout", force_generator=True)(x)

    if spec.decoder_output_stride is not None:
        low = taps[DECODER_LOW_LEVEL_LAYER]
        low_hw = tuple(low.shape[1:3])
        low = _conv_bn_relu(low, 48, "decoder_feature_projection0")
        x = ResizeBilinear(low_hw, name="decoder_resize")(x)
        x = keras.layers.Concatenate(name="decoder_concat")([x, low])
        x = _separable_conv_bn_relu(x, spec.decoder_channels, "decoder_decoder_conv0")
        x = _separable_conv_bn_relu(x, spec.decoder_channels, "decoder_decoder_conv1")

    x = keras.layers.Conv2D(spec.num_classes, 1, use_bias=True, name="logits_semantic")(x)
    logits = ResizeBilinear((height, width), name="logits_resize")(x)
    return keras.Model(inputs, logits, name=name)


def spec_from_config(cfg) -> DeepLabSpec:
    """DeepLabSpec from a composed config (``dataset``, ``backbone``, ``head`` nodes)."""
    return DeepLabSpec(
        num_classes=int(cfg.dataset.num_classes),
        crop_size=tuple(int(s) for s in cfg.dataset.crop_size),
        depth_multiplier=float(cfg.backbone.depth_multiplier),
        output_stride=int(cfg.backbone.output_stride),
        divisible_by=None if cfg.backbone.divisible_by is None else int(cfg.backbone.divisible_by),
        decoder_output_stride=None
        if cfg.head.decoder_output_stride is None
        else int(cfg.head.decoder_output_stride),
        atrous_rates=tuple(int(r) for r in cfg.head.atrous_rates),
        aspp_channels=int(cfg.head.aspp_channels),
        decoder_channels=int(cfg.head.decoder_channels),
        dropout_rate=float(cfg.head.dropout_rate),
    )


CUSTOM_OBJECTS = {"ResizeBilinear": ResizeBilinear}
