"""Procedurally generated scenes (deterministic, no files): the embedded default dataset, learnable on a CPU.

``dataset.splits`` gives the images per split and ``dataset.image_size`` their (height, width); example
``index`` of ``split`` is always the same scene, drawn from a generator seeded by (split, index). Labels are
train ids already: 0 is the background and classes 1..n-1 are shapes, so there is no label mapping.
"""

from __future__ import annotations

import colorsys
import zlib
from dataclasses import dataclass

import numpy as np

from deeplabq.data.base import DatasetError, Reader, SegmentationSplit, _cfg, _class_names
from deeplabq.data.registry import register_reader

SYNTHETIC_SHAPES = ("disc", "box", "triangle", "bar")


@dataclass
class SyntheticSplit(SegmentationSplit):
    """A split of generated scenes: ``image_ids`` only, no files."""

    synthetic_size: tuple[int, int] | None = None  # (h, w) of generated scenes

    def describe(self, index: int) -> str:
        return f"synthetic:{self.split}/{self.image_ids[index]}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic {self.split} has {len(self)} images, no index {index}")
        return _synthetic_scene(self.split, index, self.synthetic_size, self.num_classes)


@register_reader("synthetic")
class Synthetic(Reader):
    def open(self, dataset_cfg, split: str, *, name: str, num_classes: int, ignore_label: int) -> SyntheticSplit:
        splits = _cfg(dataset_cfg, "splits")
        if split not in splits:
            raise DatasetError(f"split {split!r} is not in dataset.splits ({', '.join(splits)})")
        count = int(splits[split])
        if count < 1:
            raise DatasetError(f"dataset.splits.{split} is {count}; split {split!r} has no images")
        if num_classes < 2:
            raise DatasetError(f"dataset.num_classes must be >= 2 for synthetic scenes, got {num_classes}")
        size = _cfg(dataset_cfg, "image_size")
        if size is None or len(size) != 2 or min(int(s) for s in size) < 16:
            raise DatasetError(f"dataset.image_size must be [height, width] of at least 16, got {size}")
        class_names = _class_names(dataset_cfg, num_classes, None)
        return SyntheticSplit(name, split, num_classes, ignore_label, class_names,
                              image_ids=[f"{split}_{i:05d}" for i in range(count)],
                              synthetic_size=(int(size[0]), int(size[1])))


def _synthetic_scene(split: str, index: int, size: tuple[int, int], num_classes: int):
    """A reproducible scene: textured background (class 0) with partly occluding shapes of classes 1..n-1.

    Class k is drawn as shape ``SYNTHETIC_SHAPES[(k - 1) % 4]`` in a saturated colour around hue
    ``(k - 1) / (n - 1)``; the background is desaturated, so colour and shape both identify a class.
    """
    rng = np.random.default_rng([zlib.crc32(split.encode()), index])
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    side = min(h, w)

    base = rng.uniform(60, 170) + rng.uniform(-15, 15, size=3)
    image = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    for _ in range(3):  # low-frequency gratings as texture
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.15)
        wave = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
        image += rng.uniform(5, 20) * wave[..., None] * rng.uniform(0.7, 1.0, size=3)
    image += rng.normal(0, 6, size=(h, w, 3))
    label = np.zeros((h, w), np.uint8)

    noise = rng.normal(0, 8, size=(h, w, 3))
    for _ in range(rng.integers(4, 10)):
        cls = int(rng.integers(1, num_classes))
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        mask = _shape_mask(SYNTHETIC_SHAPES[(cls - 1) % 4], yy - cy, xx - cx, side, rng)
        hue = ((cls - 1) / (num_classes - 1) + rng.uniform(-0.03, 0.03)) % 1.0
        colour = 255 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 0.95), rng.uniform(0.65, 0.95)))
        shading = rng.uniform(-0.4, 0.4) * ((yy[mask] - cy) + (xx[mask] - cx))
        image[mask] = colour + shading[:, None] + noise[mask]
        label[mask] = cls
    return np.clip(image, 0, 255).astype(np.uint8), label


def _shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "disc":
        radius = rng.uniform(0.08, 0.25) * side
        return dy**2 + dx**2 <= radius**2
    if kind == "box":
        half_h, half_w = rng.uniform(0.08, 0.25, size=2) * side
        return (np.abs(dy) <= half_h) & (np.abs(dx) <= half_w)
    if kind == "triangle":
        radius = rng.uniform(0.15, 0.35) * side
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        vy, vx = radius * np.sin(angles), radius * np.cos(angles)
        # inside when on the same side of all three (counter-clockwise) edges
        inside = np.ones(dy.shape, bool)
        for i in range(3):
            j = (i + 1) % 3
            inside &= (vx[j] - vx[i]) * (dy - vy[i]) - (vy[j] - vy[i]) * (dx - vx[i]) >= 0
        return inside
    if kind == "bar":
        length, thickness = rng.uniform(0.4, 0.8) * side, rng.uniform(0.05, 0.12) * side
        angle = rng.uniform(0, np.pi)
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        return (np.abs(along) <= length / 2) & (np.abs(across) <= thickness / 2)
    raise ValueError(f"unknown synthetic shape {kind!r}")
