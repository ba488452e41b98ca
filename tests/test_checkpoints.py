"""deeplabq.checkpoints: official TF1 names and shapes, Keras ImageNet weights, round trips, mismatch errors.

Real (tiny) models throughout. The reference shapes come from shared/reference/deeplab_checkpoint_names.md,
read by the tests only; those tests are skipped when the file is not there.
"""

import deeplabq  # noqa: I001  (before TensorFlow)
import os
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from deeplabq.checkpoints import (
    CheckpointMismatchError,
    is_tf1_ignored,
    load_deeplab_tf1_checkpoint,
    load_keras_imagenet_weights,
    load_run_weights,
    save_deeplab_tf1_checkpoint,
    tf1_name_map,
)
from deeplabq.model import DeepLabSpec, build_deeplab

REFERENCE = Path(
    os.environ.get(
        "DEEPLABQ_REFERENCE_NAMES",
        Path(deeplabq.__file__).resolve().parents[2] / "shared/reference/deeplab_checkpoint_names.md",
    )
)

# A small DeepLabv3+ with ASPP branches: every kind of head layer, quick to build.
SMALL = DeepLabSpec(
    num_classes=5, crop_size=(65, 65), depth_multiplier=0.5, output_stride=16,
    decoder_output_stride=4, atrous_rates=(6, 12, 18),
)


def reference_shapes(section: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of one lettered section of the reference file."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference file {REFERENCE} is absent (shared/ is not part of user checkouts)")
    text = REFERENCE.read_text()
    match = re.search(rf"^## {section}\..*?^```\n(.*?)^```", text, flags=re.M | re.S)
    assert match, f"section {section} not found in {REFERENCE}"
    shapes = {}
    for line in match.group(1).splitlines():
        name, shape = re.fullmatch(r"(\S+) \[(.*)\]", line.strip()).groups()
        shapes[name] = tuple(int(d) for d in shape.split(",") if d.strip())
    return shapes


def randomize(model, seed):
    """Random values for every weight, batch-norm statistics included (variances kept positive)."""
    rng = np.random.default_rng(seed)
    for var in model.weights:
        name = var.name.split("/")[-1].split(":")[0]
        shape = tuple(var.shape)
        if name in ("moving_variance", "gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("moving_mean", "beta", "bias"):
            value = rng.normal(0.0, 0.1, shape)
        else:
            value = rng.normal(0.0, 1.0, shape) * np.sqrt(1.0 / np.prod(shape[:-1]))
        var.assign(value.astype(np.float32))
    return model


def weights_of(model):
    return [w.numpy().copy() for w in model.weights]


def assert_same_weights(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def images(size, seed=0, batch=2):
    return np.random.default_rng(seed).uniform(0, 255, (batch, *size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def small_tf1_checkpoint(tmp_path_factory):
    """A randomized SMALL model, its TF1 checkpoint prefix and its logits on fixed images."""
    model = randomize(build_deeplab(SMALL), seed=1)
    prefix = save_deeplab_tf1_checkpoint(model, tmp_path_factory.mktemp("tf1") / "model.ckpt-123")
    x = images(SMALL.crop_size)
    return model, prefix, x, model(x, training=False).numpy()


@pytest.fixture(scope="module")
def scratch():
    """A SMALL model to load into; tests randomize it first, so every load must overwrite every weight."""
    return build_deeplab(SMALL)


@pytest.fixture(scope="module")
def seven_classes():
    """SMALL with another class count (only the logits differ)."""
    return build_deeplab(DeepLabSpec(**{**SMALL.__dict__, "num_classes": 7}))


# ---------------------------------------------------------------------------------------------------------
# Names and shapes against the official checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_names_and_shapes_equal_official_deeplabv3plus_checkpoint():
    reference = reference_shapes("A")
    ignored = {name for name in reference if is_tf1_ignored(name)}
    assert ignored == {"global_step", "beta1_power", "beta2_power"}
    model = build_deeplab(
        DeepLabSpec(num_classes=32, crop_size=(65, 65), depth_multiplier=1.0, output_stride=16,
                    decoder_output_stride=4)
    )
    names = tf1_name_map(model)
    expected = {name: shape for name, shape in reference.items() if name not in ignored}
    assert sorted(set(expected) - set(names)) == []
    assert sorted(set(names) - set(expected)) == []
    wrong = {n: (expected[n], tuple(v.shape)) for n, v in names.items() if tuple(v.shape) != expected[n]}
    assert wrong == {}
    assert len({id(v) for v in names.values()}) == len(model.weights) == len(names)


def tf1_from_tflite(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Section B (TFLite export, batch norm folded) name/shape -> TF1 checkpoint name/shape."""
    if name.endswith("/depthwise_weights"):  # [1, kh, kw, c] -> [kh, kw, c, 1]
        return name, (*shape[1:], 1)
    if name.endswith("/weights"):  # [out, kh, kw, in] -> [kh, kw, in, out]
        return name, (*shape[1:], shape[0])
    scope = name.rsplit("/", 1)[0]
    if scope == "logits/semantic":
        return "logits/semantic/biases", shape
    return f"{scope}/BatchNorm/beta", shape  # a folded bias stands for its batch norm


def test_shapes_equal_official_deeplabv3_dm05_export():
    reference = dict(tf1_from_tflite(n, s) for n, s in reference_shapes("B").items())
    model = build_deeplab(
        DeepLabSpec(num_classes=21, crop_size=(65, 65), depth_multiplier=0.5, output_stride=16)
    )
    names = tf1_name_map(model)
    missing = sorted(set(reference) - set(names))
    wrong = {n: (s, tuple(names[n].shape)) for n, s in reference.items() if n in names and tuple(names[n].shape) != s}
    assert missing == [] and wrong == {}
    # Nothing more in the model than the export has (besides the other batch-norm statistics).
    extra = {n for n in names if not n.endswith(("/gamma", "/moving_mean", "/moving_variance"))} - set(reference)
    assert extra == set()
    for name in names:  # every batch norm has its four variables
        if name.endswith("/beta"):
            scope = name.rsplit("/", 1)[0]
            assert {f"{scope}/{v}" for v in ("gamma", "moving_mean", "moving_variance")} <= set(names)


# ---------------------------------------------------------------------------------------------------------
# Official TF1 checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_tf1_round_trip_restores_outputs_and_uses_official_names(small_tf1_checkpoint, scratch):
    model_a, prefix, x, expected = small_tf1_checkpoint
    stored = dict(tf.train.list_variables(prefix))
    assert set(stored) == set(tf1_name_map(model_a))
    for name in (
        "MobilenetV2/Conv/weights",
        "MobilenetV2/expanded_conv/depthwise/depthwise_weights",
        "MobilenetV2/expanded_conv_3/expand/weights",
        "MobilenetV2/expanded_conv_16/project/BatchNorm/moving_variance",
        "aspp1_depthwise/depthwise_weights",
        "aspp3_pointwise/BatchNorm/gamma",
        "image_pooling/weights",
        "decoder/feature_projection0/weights",
        "decoder/decoder_conv1_pointwise/weights",
        "logits/semantic/biases",
    ):
        assert name in stored, name
    assert stored["MobilenetV2/expanded_conv_3/expand/weights"] == [1, 1, 12, 72]

    model_b = randomize(scratch, seed=2)
    report = load_deeplab_tf1_checkpoint(model_b, prefix)
    assert len(report.loaded) == len(model_b.weights) and report.skipped == [] and report.ignored == []
    assert_same_weights(weights_of(model_a), weights_of(model_b))
    np.testing.assert_array_equal(model_b(x, training=False).numpy(), expected)


def test_tf1_optimizer_and_bookkeeping_variables_are_ignored(small_tf1_checkpoint, scratch, tmp_path):
    model_a, _, x, expected = small_tf1_checkpoint
    names = tf1_name_map(model_a)
    extra = {
        "global_step": tf.constant(30000, tf.int64),
        "beta1_power": tf.constant(0.9),
        "beta2_power": tf.constant(0.99),
        "MobilenetV2/Conv/weights/Momentum": tf.zeros([3, 3, 3, 16]),
        "aspp0/weights/Adam": tf.zeros([1, 1, 160, 256]),
        "aspp0/weights/Adam_1": tf.zeros([1, 1, 160, 256]),
        "logits/semantic/biases/ExponentialMovingAverage": tf.zeros([5]),
    }
    tensors = {**{n: tf.convert_to_tensor(v) for n, v in names.items()}, **extra}
    prefix = str(tmp_path / "model.ckpt-30000")
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(tensors), shape_and_slices=[""] * len(tensors),
                      tensors=list(tensors.values()))
    model_b = randomize(scratch, seed=3)
    report = load_deeplab_tf1_checkpoint(model_b, prefix)
    assert set(report.ignored) == set(extra)
    np.testing.assert_array_equal(model_b(x, training=False).numpy(), expected)


def test_tf1_other_class_count_needs_initialize_last_layer_false(small_tf1_checkpoint, seven_classes):
    model_a, prefix, _, _ = small_tf1_checkpoint
    other = randomize(seven_classes, seed=4)
    before = weights_of(other)
    logits_before = other.get_layer("logits_semantic").kernel.numpy().copy()
    with pytest.raises(CheckpointMismatchError) as info:
        load_deeplab_tf1_checkpoint(other, prefix)
    message = str(info.value)
    assert "logits/semantic/weights: [1, 1, 256, 5] vs [1, 1, 256, 7]" in message
    assert "initialize_last_layer=False" in message and str(prefix) in message
    assert_same_weights(before, weights_of(other))

    report = load_deeplab_tf1_checkpoint(other, prefix, initialize_last_layer=False)
    assert report.skipped == ["logits/semantic/biases", "logits/semantic/weights"]
    np.testing.assert_array_equal(other.get_layer("logits_semantic").kernel.numpy(), logits_before)
    np.testing.assert_array_equal(
        other.get_layer("decoder_decoder_conv1_pointwise").kernel.numpy(),
        model_a.get_layer("decoder_decoder_conv1_pointwise").kernel.numpy(),
    )
    np.testing.assert_array_equal(other.get_layer("Conv1").kernel.numpy(), model_a.get_layer("Conv1").kernel.numpy())


def test_tf1_decoder_checkpoint_into_model_without_decoder_raises_once(small_tf1_checkpoint):
    _, prefix, _, _ = small_tf1_checkpoint
    model = build_deeplab(DeepLabSpec(**{**SMALL.__dict__, "decoder_output_stride": None}))
    before = weights_of(model)
    with pytest.raises(CheckpointMismatchError) as info:
        load_deeplab_tf1_checkpoint(model, prefix)
    error = info.value
    assert error.missing == [] and error.mismatched == []
    assert "decoder/decoder_conv0_depthwise/depthwise_weights" in error.unexpected
    assert all(name.startswith("decoder/") for name in error.unexpected)
    message = str(error)
    assert "unexpected" in message and "decoder/feature_projection0/weights" in message
    assert "decoder_output_stride=4" in message and str(prefix) in message
    assert_same_weights(before, weights_of(model))


def test_tf1_wrong_depth_multiplier_lists_shapes(small_tf1_checkpoint):
    _, prefix, _, _ = small_tf1_checkpoint
    model = build_deeplab(DeepLabSpec(**{**SMALL.__dict__, "depth_multiplier": 0.75}))
    before = weights_of(model)
    with pytest.raises(CheckpointMismatchError) as info:
        load_deeplab_tf1_checkpoint(model, prefix)
    error = info.value
    assert error.missing == [] and error.unexpected == []
    assert ("MobilenetV2/Conv/weights", (3, 3, 3, 16), (3, 3, 3, 24)) in error.mismatched
    assert "MobilenetV2/Conv/weights: [3, 3, 3, 16] vs [3, 3, 3, 24]" in str(error)
    assert "depth_multiplier" in str(error)
    assert_same_weights(before, weights_of(model))


def test_tf1_missing_checkpoint_is_a_clear_error(scratch, tmp_path):
    model = scratch
    with pytest.raises(FileNotFoundError, match="model.ckpt-1"):
        load_deeplab_tf1_checkpoint(model, tmp_path / "model.ckpt-1")


# ---------------------------------------------------------------------------------------------------------
# keras.applications ImageNet weights
# ---------------------------------------------------------------------------------------------------------


def keras_mobilenet_h5(tmp_path, alpha, size=96):
    reference = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None
    )
    randomize(reference, seed=7)
    path = tmp_path / f"mobilenet_v2_{alpha}_no_top.h5"
    reference.save_weights(str(path))
    return reference, path


def assert_same_backbone_features(ours, reference, size):
    x = images((size, size), seed=3)
    features = keras.Model(ours.input, ours.get_layer("block_16_project_BN").output)
    expected = reference.get_layer("block_16_project_BN").output
    expected = keras.Model(reference.input, expected)(x / 127.5 - 1.0, training=False).numpy()
    got = features(x, training=False).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_keras_imagenet_weights_give_keras_backbone_features(tmp_path):
    reference, path = keras_mobilenet_h5(tmp_path, alpha=1.0)
    ours = build_deeplab(DeepLabSpec(num_classes=3, crop_size=(96, 96), output_stride=32))
    head_before = ours.get_layer("aspp0").kernel.numpy().copy()
    report = load_keras_imagenet_weights(ours, path)
    assert_same_backbone_features(ours, reference, 96)
    assert set(report.ignored) == {
        "Conv_1/kernel", "Conv_1_bn/gamma", "Conv_1_bn/beta", "Conv_1_bn/moving_mean", "Conv_1_bn/moving_variance"
    }
    assert "aspp0/kernel" in report.skipped and "Conv1/kernel" in report.loaded
    np.testing.assert_array_equal(ours.get_layer("aspp0").kernel.numpy(), head_before)


def test_keras_weights_at_dm05_need_divisible_by_8(tmp_path):
    reference, path = keras_mobilenet_h5(tmp_path, alpha=0.5)
    ours = build_deeplab(
        DeepLabSpec(num_classes=3, crop_size=(96, 96), depth_multiplier=0.5, output_stride=32, divisible_by=8)
    )
    load_keras_imagenet_weights(ours, path)
    assert_same_backbone_features(ours, reference, 96)

    deeplab_rounding = build_deeplab(
        DeepLabSpec(num_classes=3, crop_size=(96, 96), depth_multiplier=0.5, output_stride=32)
    )
    before = weights_of(deeplab_rounding)
    with pytest.raises(CheckpointMismatchError) as info:
        load_keras_imagenet_weights(deeplab_rounding, path)
    error = info.value
    assert error.missing == [] and error.unexpected == []
    # research/deeplab: block 1 projects to 12 channels, keras rounds to 16
    assert ("block_1_project/kernel", (1, 1, 48, 16), (1, 1, 48, 12)) in error.mismatched
    assert "block_1_project/kernel: [1, 1, 48, 16] vs [1, 1, 48, 12]" in str(error)
    assert "divisible_by=8" in str(error) and str(path) in str(error)
    assert_same_weights(before, weights_of(deeplab_rounding))


def test_keras_weights_missing_file_is_a_clear_error(scratch, tmp_path):
    model = scratch
    with pytest.raises(FileNotFoundError, match="imagenet"):
        load_keras_imagenet_weights(model, tmp_path / "nope.h5")


# ---------------------------------------------------------------------------------------------------------
# Weights of a previous run
# ---------------------------------------------------------------------------------------------------------


def test_run_weights_round_trip_in_every_form(small_tf1_checkpoint, scratch, tmp_path):
    model_a, _, x, expected = small_tf1_checkpoint
    optimizer = keras.optimizers.Adam()
    optimizer.build(model_a.trainable_variables)  # slots in the checkpoint, as the trainer writes them
    run_dir = tmp_path / "run"
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model_a, optimizer=optimizer), str(run_dir / "checkpoints"), max_to_keep=2
    )
    prefix = manager.save()
    model_a.save_weights(str(tmp_path / "w.weights.h5"))
    model_a.save_weights(str(tmp_path / "w.h5"))
    model_a.save_weights(str(tmp_path / "tf_weights"))  # TF format: the model is the checkpoint's root

    sources = (run_dir, run_dir / "checkpoints", prefix, tmp_path / "w.weights.h5", tmp_path / "w.h5",
               tmp_path / "tf_weights")
    for seed, source in enumerate(sources, start=10):
        model_b = randomize(scratch, seed)
        report = load_run_weights(model_b, source)
        assert len(report.loaded) == len(model_b.weights), source
        assert_same_weights(weights_of(model_a), weights_of(model_b))
        np.testing.assert_array_equal(model_b(x, training=False).numpy(), expected)


def test_run_weights_mismatch_raises_and_keeps_the_model(small_tf1_checkpoint, seven_classes, tmp_path):
    model_a, tf1_prefix, _, _ = small_tf1_checkpoint
    prefix = tf.train.Checkpoint(model=model_a).write(str(tmp_path / "checkpoints" / "ckpt-1"))
    model_a.save_weights(str(tmp_path / "w.weights.h5"))
    model_a.save_weights(str(tmp_path / "w.h5"))
    other = seven_classes
    before = weights_of(other)
    for source in (prefix, tmp_path / "w.weights.h5", tmp_path / "w.h5"):
        with pytest.raises(CheckpointMismatchError) as info:
            load_run_weights(other, source)
        message = str(info.value)
        assert str(source) in message and "wrong shape" in message and "7]" in message, message
        assert_same_weights(before, weights_of(other))

    with pytest.raises(CheckpointMismatchError, match="load_deeplab_tf1_checkpoint"):
        load_run_weights(other, tf1_prefix)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="No TF checkpoint in .*empty_run"):
        load_run_weights(other, tmp_path / "empty_run")


@pytest.mark.slow
def test_run_weights_of_a_quantization_aware_model(tmp_path):
    """A second QAT model in one process names tfmot's input QuantizeLayer 'quantize_layer_1', which is in
    its variables' checkpoint keys; such renamed variables still load (and everything else still must)."""
    from deeplabq.quantization import quantize_model

    spec = DeepLabSpec(num_classes=3, crop_size=(33, 33), depth_multiplier=0.35)
    model_a = randomize(quantize_model(build_deeplab(spec)), seed=5)
    for var in model_a.weights:  # keep the fake-quant ranges ordered and the step counters integral
        if var.dtype != tf.float32:
            var.assign(tf.zeros_like(var))
        elif var.name.endswith(("_min:0", "_max:0")):
            var.assign(tf.fill(var.shape, -3.0 if var.name.endswith("_min:0") else 3.0))
    prefix = tf.train.Checkpoint(model=model_a).write(str(tmp_path / "checkpoints" / "ckpt-1"))
    model_a.save_weights(str(tmp_path / "w.h5"))
    x = images(spec.crop_size)
    model_b = quantize_model(build_deeplab(spec))
    for seed, source in enumerate((prefix, tmp_path / "w.h5")):
        randomize(model_b, seed)
        for var in model_b.weights:
            if var.dtype != tf.float32:
                var.assign(tf.ones_like(var))
        load_run_weights(model_b, source)
        assert_same_weights(weights_of(model_a), weights_of(model_b))
        np.testing.assert_array_equal(model_b(x, training=False).numpy(), model_a(x, training=False).numpy())

    float_model = build_deeplab(spec)
    with pytest.raises(CheckpointMismatchError, match="quantize_model"):
        load_run_weights(float_model, prefix)
