"""deeplabq.figures: every figure is a PNG Pillow can open; palette and normalisation do what they say."""

import numpy as np
import pytest
from PIL import Image

from deeplabq import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["road", "sky", "car", "person"]


def assert_png(path, min_side=200):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side and max(image.size) < 10_000


def test_palette_is_fixed_distinct_and_never_black():
    for n in (1, 4, 20, 21, 151, 255):
        palette = figures.label_palette(n)
        assert palette.shape == (n, 3) and palette.dtype == np.uint8
        assert len({tuple(c) for c in palette}) == n
        assert not np.any(np.all(palette == 0, axis=1))
    np.testing.assert_array_equal(figures.label_palette(5), figures.label_palette(5))
    np.testing.assert_array_equal(figures.label_palette(20)[:5], figures.label_palette(5))


def test_colorize_maps_ignore_to_black_and_classes_to_distinct_colours():
    labels = np.array([[0, 1, 2], [255, 2, 7]])  # 7 is not a class of 3
    colours = figures.colorize(labels, num_classes=3, ignore_label=255)
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
    assert np.all(colours[1, 0] == 0) and np.all(colours[1, 2] == 0)
    assert len({tuple(colours[0, j]) for j in range(3)}) == 3
    np.testing.assert_array_equal(colours[0, 2], colours[1, 1])
    # an ignore label inside the class range (ADE20K's 0) is black too
    assert np.all(figures.colorize(np.array([[0, 1]]), 3, ignore_label=0)[0, 0] == 0)


def test_per_class_iou_figure_with_a_missing_class(tmp_path):
    ious = {"float": {"road": 90.0, "sky": 80.0, "car": 50.0, "person": 30.0},
            "int8": {"road": 88.0, "sky": 79.0, "car": float("nan")}}  # car NaN, person missing: gaps
    path = figures.per_class_iou_figure(ious, CLASSES, tmp_path / "out" / "iou.png")
    assert_png(path)


def test_confusion_matrix_rows_sum_to_100_percent(tmp_path):
    matrix = np.array([[50, 5, 0, 0], [10, 30, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
    percent = figures.confusion_matrix_figure(matrix, CLASSES, tmp_path / "cm.png", title="test")
    assert_png(tmp_path / "cm.png")
    np.testing.assert_allclose(percent[[0, 1, 3]].sum(axis=1), 100)
    assert np.all(np.isnan(percent[2]))  # a class with no pixels is a blank row, not a division by zero
    np.testing.assert_allclose(percent[0, :2], [100 * 50 / 55, 100 * 5 / 55])


def test_confusion_matrix_of_many_classes_has_no_cell_numbers(tmp_path):
    matrix = np.random.default_rng(0).integers(0, 100, (30, 30))
    percent = figures.confusion_matrix_figure(matrix, [f"c{i}" for i in range(30)], tmp_path / "cm30.png")
    assert_png(tmp_path / "cm30.png")
    np.testing.assert_allclose(percent.sum(axis=1), 100)


def test_overlay_figure_keeps_at_most_four_rows(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for k in range(6):
        label = rng.integers(0, 4, (40, 60)).astype(np.uint8)
        label[:5] = 255
        image = rng.uniform(0, 255, (40, 60, 3)).astype(np.float32 if k % 2 else np.uint8)
        samples.append((image, label, rng.integers(0, 4, (40, 60))))
    figures.overlay_figure(samples, num_classes=4, ignore_label=255, path=tmp_path / "four.png")
    figures.overlay_figure(samples[:1], num_classes=4, ignore_label=255, path=tmp_path / "one.png")
    assert_png(tmp_path / "four.png")
    assert_png(tmp_path / "one.png")
    with Image.open(tmp_path / "four.png") as four, Image.open(tmp_path / "one.png") as one:
        assert four.size[0] == one.size[0] and four.size[1] > 3 * one.size[1] * 0.8
    with pytest.raises(ValueError, match="at least one"):
        figures.overlay_figure([], 4, 255, tmp_path / "none.png")


def test_tradeoff_figure(tmp_path):
    points = [
        {"name": "float", "miou": 70.0, "latency_ms": 40.0, "size_bytes": 8_000_000, "baseline": True},
        {"name": "int8", "miou": 68.0, "latency_ms": 15.0, "size_bytes": 2_100_000},
        {"name": "int8", "miou": 66.0, "latency_ms": 9.0, "size_bytes": 900_000},  # a repeated name
        {"name": "float16", "miou": 70.0, "latency_ms": float("nan"), "size_bytes": 4_000_000},
        {"name": "qat_int8", "miou": 69.0, "size_bytes": 2_100_000},  # no latency at all
    ]
    assert_png(figures.tradeoff_figure(points, tmp_path / "tradeoff.png"))


def test_tradeoff_figure_with_one_point_and_no_latency(tmp_path):
    one = [{"name": "float", "miou": 50.0, "latency_ms": 12.0, "size_bytes": 1_000_000, "baseline": True}]
    assert_png(figures.tradeoff_figure(one, tmp_path / "one.png", title="one point"))
    nan = [{"name": "int8", "miou": 50.0, "latency_ms": float("nan"), "size_bytes": 1_000_000}]
    assert_png(figures.tradeoff_figure(nan, tmp_path / "nan.png"))

