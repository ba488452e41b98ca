"""Segmenter (any source, whole images at their own size) and predict.py's job, on a tiny float TFLite file."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deeplabq import data as data_lib
from deeplabq.errors import ConfigError, UserError
from deeplabq.evaluation import TFLiteSegmenter
from deeplabq.segmenter import Segmenter
from deeplabq.tasks.predict import predict

from .conftest import TINY_ARCHITECTURE, TINY_DATASET, compose_config


@pytest.fixture
def tflite_file(tmp_path, tiny_float_tflite):
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tiny_float_tflite)
    return path


def config(tmp_path, tflite_file, *overrides):
    return compose_config(tmp_path, [*TINY_DATASET, f"source={tflite_file}", f"input={tmp_path / 'images'}",
                                     *overrides], config_name="predict")


def images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 30, 3), (33, 25, 3))]


def test_labels_at_the_original_size_agree_with_the_evaluation_path(tmp_path, tflite_file):
    cfg = config(tmp_path, tflite_file)
    segmenter = Segmenter.from_source(str(tflite_file), cfg)
    reference = TFLiteSegmenter(str(tflite_file))
    for image in images():
        labels = segmenter.segment(image)
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
        padded, _, valid_hw = data_lib.preprocess_for_eval(image, None, segmenter.dataset_cfg)
        assert valid_hw == image.shape[:2]  # no resizing here: the crop is the whole prediction
        np.testing.assert_array_equal(labels, reference.predict(padded)[: valid_hw[0], : valid_hw[1]])


def test_a_wrong_channel_count_or_an_empty_image_is_refused(tmp_path, tflite_file):
    segmenter = Segmenter.from_source(str(tflite_file), config(tmp_path, tflite_file))
    with pytest.raises(ConfigError, match="HxWx3"):
        segmenter.segment(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(ConfigError, match="empty"):
        segmenter.segment(np.zeros((0, 20, 3), np.uint8))


def write_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images()):
        Image.fromarray(image).save(folder / f"img{index}.png")
    return folder


def test_predict_writes_label_pngs_and_never_overwrites(tmp_path, tflite_file):
    folder = write_images(tmp_path)
    cfg = config(tmp_path, tflite_file, "overlay=true")
    predict(cfg, tmp_path / "run")
    segmenter = Segmenter.from_source(str(tflite_file), cfg)
    out = tmp_path / "run" / "labels"
    for index, image in enumerate(images()):
        with Image.open(out / f"img{index}.png") as png:
            assert png.mode == "P"
            np.testing.assert_array_equal(np.asarray(png), segmenter.segment(image))
        assert (out / f"img{index}_overlay.png").is_file()
    with pytest.raises(ConfigError, match="img0.png exists; set overwrite=true"):
        predict(cfg, tmp_path / "run")
    predict(config(tmp_path, tflite_file, "overwrite=true"), tmp_path / "run")
    assert folder.is_dir()


def test_an_unreadable_image_is_skipped_and_counted(tmp_path, tflite_file, capsys):
    folder = write_images(tmp_path)
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="1 of 3 images could not be read"):
        predict(config(tmp_path, tflite_file), tmp_path / "run")
    assert "cannot read image" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run" / "labels").iterdir()) == ["img0.png", "img1.png"]


def test_a_checkpoint_source_segments_with_keras_as_its_tflite_file_does(tmp_path, tflite_file, tiny_model):
    prefix = tf.train.Checkpoint(model=tiny_model).write(str(tmp_path / "ckpt" / "ckpt-1"))
    cfg = config(tmp_path, tflite_file, *TINY_ARCHITECTURE)
    keras_segmenter = Segmenter.from_source(prefix, cfg)
    tflite_segmenter = Segmenter.from_source(str(tflite_file), cfg)
    for image in images():
        labels = keras_segmenter.segment(image)
        assert labels.shape == image.shape[:2]
        assert np.mean(labels == tflite_segmenter.segment(image)) > 0.99  # float conversion: argmax ties aside
