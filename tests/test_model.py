"""deeplabq.model: DeepLabv3 / v3+ output shapes at each output stride, the spec's checks, the dilation schedule
and the layer names that ImageNet weights and official checkpoints load by."""

import numpy as np
import pytest
import tf_keras as keras

from deeplabq.model import (
    DeepLabSpec,
    ResizeBilinear,
    build_deeplab,
    feature_size,
    make_divisible,
    native_dilated_convolutions,
    spec_from_config,
)

from .conftest import compose_config

SMALL = {"depth_multiplier": 0.35, "aspp_channels": 16, "decoder_channels": 16}


@pytest.fixture(scope="module")
def models():
    """{(head, output stride): model}, 33x41 input (height != width), 4 classes."""
    return {(head, stride): build_deeplab(DeepLabSpec(num_classes=4, crop_size=(33, 41), output_stride=stride,
                                                      decoder_output_stride=4 if head == "v3plus" else None,
                                                      **SMALL))
            for head in ("v3", "v3plus") for stride in (8, 16)}


@pytest.mark.parametrize("stride", [8, 16])
@pytest.mark.parametrize("head", ["v3", "v3plus"])
def test_logits_come_out_at_input_size(models, head, stride):
    model = models[head, stride]
    logits = model(np.zeros((2, 33, 41, 3), np.float32), training=False)
    assert tuple(logits.shape) == (2, 33, 41, 4)
    assert model.output_shape == (None, 33, 41, 4)
    assert model.get_layer("aspp0").output_shape[1:3] == (feature_size(33, stride), feature_size(41, stride))


def test_decoder_only_in_v3plus(models):
    def names(model):
        return {layer.name for layer in model.layers}

    decoder = {"decoder_feature_projection0", "decoder_feature_projection0_BN", "decoder_decoder_conv0_depthwise",
               "decoder_decoder_conv1_pointwise"}
    assert decoder <= names(models["v3plus", 16])
    assert not decoder & names(models["v3", 16])
    # The decoder reads the stride-4 features: 33x41 -> 9x11.
    assert models["v3plus", 16].get_layer("decoder_feature_projection0").output_shape[1:3] == (9, 11)


def test_checkpoint_layer_names(models):
    """keras.applications.MobileNetV2 names in the backbone, research/deeplab's TF1 scopes in the head."""
    model = models["v3", 16]
    for name in ("Conv1", "bn_Conv1", "expanded_conv_depthwise", "expanded_conv_project_BN", "block_1_expand",
                 "block_16_project", "block_16_project_BN", "image_pooling", "image_pooling_BN", "aspp0", "aspp0_BN",
                 "concat_projection", "concat_projection_BN", "logits_semantic"):
        assert model.get_layer(name).weights, name
    assert model.get_layer("logits_semantic").kernel.shape == (1, 1, 16, 4)
    assert model.get_layer("Conv1").kernel.shape == (3, 3, 3, 11)  # research/deeplab rounds dm < 1 to 1: 32 * 0.35


@pytest.mark.parametrize(("stride", "schedule"), [
    # (block, strides, dilation rate): the stride that would pass output_stride becomes dilation from then on.
    (16, [(12, 1, 1), (13, 1, 1), (14, 1, 2), (16, 1, 2)]),
    (8, [(5, 1, 1), (6, 1, 1), (7, 1, 2), (13, 1, 2), (14, 1, 4), (16, 1, 4)]),
])
def test_dilation_schedule_follows_output_stride(models, stride, schedule):
    model = models["v3", stride]
    for block, strides, rate in schedule:
        layer = model.get_layer(f"block_{block}_depthwise")
        assert (layer.strides, layer.dilation_rate) == ((strides, strides), (rate, rate)), block


def test_atrous_rates_add_separable_aspp_branches():
    model = build_deeplab(DeepLabSpec(num_classes=3, crop_size=(33, 33), atrous_rates=(6, 12), **SMALL))
    assert model.get_layer("aspp2_depthwise").dilation_rate == (12, 12)
    assert model.get_layer("aspp_concat").output_shape[-1] == 4 * 16  # pooling, aspp0, aspp1, aspp2


@pytest.mark.parametrize(("change", "key"), [
    ({"output_stride": 12}, "backbone.output_stride"),
    ({"crop_size": (8, 33)}, "dataset.crop_size"),
    ({"crop_size": (33,)}, "dataset.crop_size"),
    ({"num_classes": 1}, "dataset.num_classes"),
    ({"depth_multiplier": 0.0}, "backbone.depth_multiplier"),
    ({"decoder_output_stride": 8}, "head.decoder_output_stride"),
    ({"divisible_by": 4}, "backbone.divisible_by"),
    ({"atrous_rates": (6, 0)}, "head.atrous_rates"),
])
def test_validate_names_the_key_of_an_impossible_value(change, key):
    spec = DeepLabSpec(**{"num_classes": 3, "crop_size": (33, 33), **change})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        spec.validate()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_deeplab(spec)


def test_channel_rounding_and_feature_sizes():
    assert DeepLabSpec(3, (33, 33)).channel_divisor == 8
    assert DeepLabSpec(3, (33, 33), depth_multiplier=0.5).channel_divisor == 1
    assert DeepLabSpec(3, (33, 33), depth_multiplier=0.5, divisible_by=8).channel_divisor == 8
    assert make_divisible(32 * 0.35, 8) == 16  # 8 would be more than 10% below 11.2
    assert make_divisible(96 * 0.5, 8) == 48 and make_divisible(24 * 0.5, 1) == 12
    assert [feature_size(513, s) for s in (4, 8, 16, 32)] == [129, 65, 33, 17]
    assert feature_size(33, 16) == 3


def test_spec_from_config_reads_dataset_backbone_and_head(tmp_path):
    cfg = compose_config(tmp_path, ["head=deeplabv3plus", "backbone.output_stride=8", "dataset.crop_size=[65,97]"])
    spec = spec_from_config(cfg)
    assert spec.num_classes == 5 and spec.crop_size == (65, 97)
    assert spec.output_stride == 8 and spec.decoder_output_stride == 4 and spec.depth_multiplier == 0.5


def test_resize_bilinear_aligns_corners_and_round_trips_its_config():
    layer = ResizeBilinear((3, 3), name="r")
    out = layer(np.array([[0.0, 2.0], [4.0, 6.0]], np.float32).reshape(1, 2, 2, 1)).numpy()[0, ..., 0]
    np.testing.assert_allclose(out, [[0, 1, 2], [2, 3, 4], [4, 5, 6]])
    clone = ResizeBilinear.from_config(layer.get_config())
    assert clone.size == (3, 3) and clone.align_corners


def test_native_dilated_convolutions_restores_keras_call_even_on_error():
    original = keras.layers.DepthwiseConv2D.call
    with pytest.raises(RuntimeError), native_dilated_convolutions():
        assert keras.layers.DepthwiseConv2D.call is not original
        raise RuntimeError
    assert keras.layers.DepthwiseConv2D.call is original
