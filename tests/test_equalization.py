"""Corrections of the float model before PTQ: cross-layer equalization keeps the float function, empirical bias
correction removes the mean output error of the int8 weights, and both reach the int8 export."""

import numpy as np
import pytest
import tf_keras as keras

from deeplabq import export
from deeplabq.config import ExportSpec
from deeplabq.model import build_deeplab
from deeplabq.quantization import equalization, reestimate_batch_norm

from .conftest import TINY_SPEC, tiny_images


@pytest.fixture(scope="module")
def live_model():
    """TINY_SPEC with batch norm re-estimated on images, so activations (and ReLU6 saturation) are realistic."""
    keras.utils.set_random_seed(0)
    model = build_deeplab(TINY_SPEC)
    reestimate_batch_norm(model, np.stack(tiny_images(8, seed=1)))
    return model


def test_equalization_keeps_the_float_function(live_model):
    calibration, other = np.stack(tiny_images(8, seed=2)), np.stack(tiny_images(4, seed=3))
    equalized, records = equalization.equalize_depthwise_pointwise(live_model, list(calibration))
    assert len(records) == 17  # expanded_conv and block_1..16
    assert sum(r["channels"] - r["kept"] for r in records) > 1000  # most channels were rescaled
    project = [m.get_layer("block_5_project").kernel.numpy() for m in (equalized, live_model)]
    changed = project[0] / project[1]
    assert np.ptp(changed) > 0.1
    for images, tolerance in ((calibration, 1e-4), (other, 1e-2)):  # exact where ReLU6 was measured, close elsewhere
        before, after = live_model(images).numpy(), equalized(images).numpy()
        assert np.max(np.abs(after - before)) <= tolerance * np.max(np.abs(before))


def _mean_output_error(model, reference, images, per_channel):
    targets = equalization._conv_targets(model)
    quantized = equalization._with_quantized_weights(model, targets, per_channel)(images).numpy()
    return float(np.mean(np.abs(np.mean(quantized - reference, axis=(0, 1, 2)))))


@pytest.mark.parametrize("per_channel", [False, True])
def test_bias_correction_reduces_the_mean_output_error_of_int8_weights(live_model, per_channel):
    images = np.stack(tiny_images(8, seed=2))
    reference = live_model(images).numpy()
    corrected, count = equalization.correct_bias(live_model, list(images), per_channel=per_channel)
    assert count == 55  # every conv: 54 with batch norm, and the logits with their bias
    before = _mean_output_error(live_model, reference, images, per_channel)
    after = _mean_output_error(corrected, reference, images, per_channel)
    assert after < 0.5 * before, (before, after)


def test_int8_export_with_both_corrections(tmp_path, live_model):
    images = tiny_images(6, seed=2)
    exported = export.export_variant(
        live_model, "int8", tmp_path / "int8.tflite", check_images=images[:2], representative_images=images,
        export_cfg=ExportSpec(per_channel=False, cross_layer_equalization=True, bias_correction=True))
    assert exported.agreement > 0.8 and exported.xnnpack_partitions == 1


def test_corrections_default_to_on_for_per_tensor_weights_only():
    assert (ExportSpec().equalize, ExportSpec().correct_bias) == (False, False)
    assert (ExportSpec(per_channel=False).equalize, ExportSpec(per_channel=False).correct_bias) == (True, True)
    explicit = ExportSpec(per_channel=False, cross_layer_equalization=False, bias_correction=True)
    assert (explicit.equalize, explicit.correct_bias) == (False, True)


def test_bias_correction_leaves_the_layers_kept_float_alone(live_model):
    corrected, count = equalization.correct_bias(live_model, tiny_images(2, seed=2), per_channel=False,
                                                 float_layers=("block_3_depthwise", "logits_semantic"))
    assert count == 53
    for name, weight in (("block_3_depthwise_BN", "beta"), ("logits_semantic", "bias")):
        kept = [getattr(m.get_layer(name), weight).numpy() for m in (live_model, corrected)]
        assert np.array_equal(*kept)
    assert not np.array_equal(live_model.get_layer("block_4_depthwise_BN").beta.numpy(),
                              corrected.get_layer("block_4_depthwise_BN").beta.numpy())
