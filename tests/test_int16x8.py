"""The 16x8 variant (int16 activations, int8 weights): it converts, loads and runs in LiteRT, agrees with its
Keras model, runs none of its ops in XNNPACK, and a file LiteRT cannot run fails naming the op."""

import numpy as np
import pytest
import tf_keras as keras

from deeplabq import export
from deeplabq.config import ExportSpec
from deeplabq.evaluation import TFLiteSegmenter
from deeplabq.model import build_deeplab
from deeplabq.quantization import op_histogram, reestimate_batch_norm, tensor_types, xnnpack_partitions

from .conftest import TINY_SPEC, tiny_images


@pytest.fixture(scope="module")
def live_model():
    """TINY_SPEC with batch norm re-estimated on images: no layer whose output is all zeros (random weights
    leave some, and a 16x8 ReLU6 on a range of width ~0 cannot be prepared; see the test below)."""
    keras.utils.set_random_seed(0)
    model = build_deeplab(TINY_SPEC)
    reestimate_batch_norm(model, np.stack(tiny_images(8, seed=1)))
    return model


def test_16x8_file_loads_runs_and_agrees_with_its_keras_model(tmp_path, live_model):
    images = tiny_images(4)
    exported = export.export_variant(live_model, "int16x8", tmp_path / "int16x8.tflite", check_images=images[:2],
                                     export_cfg=ExportSpec(), representative_images=images)
    tflite = exported.path.read_bytes()
    conv_outputs = {dtype for op, _, dtype in tensor_types(tflite) if op in ("CONV_2D", "DEPTHWISE_CONV_2D")}
    assert conv_outputs == {"INT16"}, conv_outputs
    assert op_histogram(tflite).get("CONV_2D", 0) > 10
    assert xnnpack_partitions(tflite) == 0  # XNNPACK has no 16-bit activations: honest latency is TFLite's kernels
    assert exported.agreement > 0.9
    labels = TFLiteSegmenter(str(exported.path)).predict(images[0])
    assert labels.shape == (33, 33) and labels.max() < TINY_SPEC.num_classes


def test_a_16x8_file_litert_cannot_run_fails_that_variant_naming_the_op(tmp_path, tiny_model):
    # The random-weight tiny model has a layer whose output is always 0: its 16x8 range is ~1e-10 wide and
    # LiteRT refuses to prepare the conv writing it.
    images = tiny_images(4)
    with pytest.raises(export.ExportError, match=r"'int16x8' failed: LiteRT cannot prepare op CONV_2D \(layer \w+\)"):
        export.export_variant(tiny_model, "int16x8", tmp_path / "int16x8.tflite", check_images=images[:1],
                              export_cfg=ExportSpec(), representative_images=images)
    assert not (tmp_path / "int16x8.tflite").exists()
