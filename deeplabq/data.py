"""Segmentation datasets on their real on-disk layouts, DeepLab preprocessing, and the tf.data input pipeline.

``open_split(cfg.dataset, split)`` picks a reader by ``dataset.name`` and checks the layout upfront (root,
split, image/label pairing). ``SegmentationSplit.load`` decodes one example with PIL (palette PNGs keep their
indices) and maps raw label values to train ids. ``input_pipeline`` decodes in parallel inside
``tf.numpy_function`` and augments with TF ops as ``research/deeplab/input_preprocess.py`` does.
``preprocess_for_eval`` / ``postprocess_labels`` are the same evaluation steps for a model that has no pre- or
post-processing inside it (a TFLite file).

Faithfulness notes:
- Resizing follows deeplab's ``preprocess_utils.resize_to_range`` exactly, including its rounding: with a
  ``resize_factor`` the long-side limit becomes ``max - (max - 1) % factor`` and both sides are rounded *up*
  to a multiple of the factor plus one (so min=max=512, factor 16 gives at most 497 pixels). With only
  ``max_resize_value`` set, images are shrunk to fit and never enlarged (deeplab requires a min value).
- Resizes use TF1's ``align_corners=True`` like deeplab (bilinear for images, nearest for labels), in the
  pipeline and in ``preprocess_for_eval`` alike, so both evaluation paths see identical inputs.
- Random choices are stateless, seeded by ``(seed, n)`` for the n-th example drawn, so augmentation does not
  depend on thread scheduling.
"""

from __future__ import annotations

import colorsys
import functools
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf  # deeplabq/__init__.py, which always runs first, has set TF_USE_LEGACY_KERAS
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

MEAN_PIXEL = 127.5  # deeplab pads images with this value, so padding is 0 after scaling to [-1, 1]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# cityscapesscripts labels.py: the labelIds of the 19 evaluated classes, trainId = position; others ignored.
CITYSCAPES_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
SYNTHETIC_SHAPES = ("disc", "box", "triangle", "bar")


class DatasetError(ValueError):
    """A dataset problem; the message names the file, config key or value at fault."""


@dataclass
class SegmentationSplit:
    """One split of a dataset: examples by index, labels already mapped to train ids."""

    name: str
    split: str
    num_classes: int
    ignore_label: int
    class_names: list[str]
    image_ids: list[str] = field(repr=False)
    image_paths: list[Path] = field(default_factory=list, repr=False)
    label_paths: list[Path] = field(default_factory=list, repr=False)
    label_lut: np.ndarray | None = field(default=None, repr=False)  # raw value (0..255) -> train id
    synthetic_size: tuple[int, int] | None = None  # (h, w) of generated scenes; None for file datasets

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self, index: int) -> str:
        if self.synthetic_size is not None:
            return f"synthetic:{self.split}/{self.image_ids[index]}"
        return f"{self.image_paths[index]} (label {self.label_paths[index]})"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 HxWx3 RGB and label uint8 HxW in train ids (ignored pixels = ignore_label)."""
        if self.synthetic_size is not None:
            if not 0 <= index < len(self):
                raise IndexError(f"synthetic {self.split} has {len(self)} images, no index {index}")
            return _synthetic_scene(self.split, index, self.synthetic_size, self.num_classes)
        image_path, label_path = self.image_paths[index], self.label_paths[index]
        image = _read_image(image_path)
        label = _read_label(label_path)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"image {image_path} is {image.shape[0]}x{image.shape[1]} but its label {label_path} is "
                f"{label.shape[0]}x{label.shape[1]} (height x width)"
            )
        if self.label_lut is not None:
            label = self.label_lut[label]
        bad = (label >= self.num_classes) & (label != self.ignore_label)
        if bad.any():
            values = np.unique(label[bad]).tolist()
            raise DatasetError(
                f"label file {label_path} has values {values[:10]} outside 0..{self.num_classes - 1} that "
                f"are not the ignore label {self.ignore_label} (dataset.num_classes={self.num_classes})"
            )
        return image, label


# ----------------------------------------------------------------------------------------------- config


def _cfg(dataset_cfg, key: str):
    try:
        return dataset_cfg[key]
    except MissingMandatoryValue as err:
        raise DatasetError(f"dataset.{key} must be set (it is ??? in the config)") from err


def _opt(dataset_cfg, key: str, default=None):
    return dataset_cfg[key] if key in dataset_cfg and dataset_cfg[key] is not None else default


@dataclass(frozen=True)
class _Preprocessing:
    crop_size: tuple[int, int]
    min_resize_value: int | None
    max_resize_value: int | None
    resize_factor: int | None
    min_scale_factor: float
    max_scale_factor: float
    scale_factor_step_size: float
    flip: bool
    ignore_label: int

    @property
    def resizes(self) -> bool:
        return self.min_resize_value is not None or self.max_resize_value is not None


def _preprocessing(dataset_cfg) -> _Preprocessing:
    crop = _cfg(dataset_cfg, "crop_size")
    if crop is None or len(crop) != 2 or any(int(c) < 1 for c in crop):
        raise DatasetError(f"dataset.crop_size must be [height, width] of positive ints, got {crop}")
    params = _Preprocessing(
        crop_size=(int(crop[0]), int(crop[1])),
        min_resize_value=_opt(dataset_cfg, "min_resize_value"),
        max_resize_value=_opt(dataset_cfg, "max_resize_value"),
        resize_factor=_opt(dataset_cfg, "resize_factor"),
        min_scale_factor=float(_opt(dataset_cfg, "min_scale_factor", 1.0)),
        max_scale_factor=float(_opt(dataset_cfg, "max_scale_factor", 1.0)),
        scale_factor_step_size=float(_opt(dataset_cfg, "scale_factor_step_size", 0.0)),
        flip=bool(_opt(dataset_cfg, "flip", False)),
        ignore_label=int(_cfg(dataset_cfg, "ignore_label")),
    )
    if not 0 < params.min_scale_factor <= params.max_scale_factor:
        raise DatasetError(
            f"dataset.min_scale_factor ({params.min_scale_factor}) must be > 0 and <= "
            f"dataset.max_scale_factor ({params.max_scale_factor})"
        )
    if params.scale_factor_step_size < 0:
        step = params.scale_factor_step_size
        raise DatasetError(f"dataset.scale_factor_step_size must be >= 0, got {step}")
    return params


def _class_names(dataset_cfg, num_classes: int, root: Path | None) -> list[str]:
    names = _opt(dataset_cfg, "class_names")
    source = "dataset.class_names"
    if names is None and root is not None and (root / "classes.txt").is_file():
        source = str(root / "classes.txt")
        names = [line.strip() for line in _read_lines(root / "classes.txt") if line.strip()]
    if names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise DatasetError(
            f"{source} lists {len(names)} class names but dataset.num_classes is {num_classes}"
        )
    return [str(n) for n in names]


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------------------------------------- readers


def open_split(dataset_cfg, split: str) -> SegmentationSplit:
    """Open ``split`` of the dataset ``dataset_cfg.name``, checking the layout before any decoding."""
    name = _cfg(dataset_cfg, "name")
    num_classes = int(_cfg(dataset_cfg, "num_classes"))
    ignore_label = int(_cfg(dataset_cfg, "ignore_label"))
    if num_classes < 1:
        raise DatasetError(f"dataset.num_classes must be >= 1, got {num_classes}")
    if not 0 <= ignore_label <= 255:
        raise DatasetError(f"dataset.ignore_label must be in 0..255 (labels are 8-bit), got {ignore_label}")

    if name == "synthetic":
        return _synthetic_split(dataset_cfg, split, num_classes, ignore_label)
    if name not in _READERS:
        known = ", ".join(["synthetic", *_READERS])
        raise DatasetError(f"dataset.name={name!r} has no reader; known: {known}")

    raw_root = _cfg(dataset_cfg, "root")
    if raw_root is None:
        raise DatasetError(f"dataset.root must be set for dataset {name!r}")
    root = Path(str(raw_root)).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset.root {root} does not exist or is not a directory")

    ids, images, labels = _READERS[name](root, split, dataset_cfg)  # each raises on an empty split
    missing = [(i, lbl) for i, lbl in zip(images, labels, strict=True) if not lbl.is_file()]
    if missing:
        image, label = missing[0]
        raise DatasetError(
            f"{len(missing)} of {len(images)} images of split {split!r} have no label file, "
            f"e.g. {label} for image {image}"
        )
    return SegmentationSplit(
        name=name,
        split=split,
        num_classes=num_classes,
        ignore_label=ignore_label,
        class_names=_class_names(dataset_cfg, num_classes, root),
        image_ids=ids,
        image_paths=images,
        label_paths=labels,
        label_lut=_label_lut(name, dataset_cfg, ignore_label),
    )


def _label_lut(name: str, dataset_cfg, ignore_label: int) -> np.ndarray | None:
    if name == "cityscapes":
        lut = np.full(256, ignore_label, np.uint8)
        lut[list(CITYSCAPES_EVAL_LABEL_IDS)] = np.arange(len(CITYSCAPES_EVAL_LABEL_IDS))
        return lut
    max_label = _opt(dataset_cfg, "max_label")
    if max_label is not None:
        lut = np.arange(256, dtype=np.uint8)
        lut[int(max_label) + 1 :] = ignore_label
        return lut
    return None


def _files(directory: Path, what: str, suffixes=IMAGE_SUFFIXES, pattern: str = "*") -> list[Path]:
    if not directory.is_dir():
        raise DatasetError(f"{what} directory {directory} does not exist")
    files = sorted(p for p in directory.glob(pattern) if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise DatasetError(f"{what} directory {directory} has no {'/'.join(suffixes)} files")
    return files


def _camvid(root: Path, split: str, dataset_cfg):
    images = _files(root / split, f"split {split!r}", (".png",))
    return [p.stem for p in images], images, [root / f"{split}annot" / p.name for p in images]


def _pascal_voc(root: Path, split: str, dataset_cfg):
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise DatasetError(f"split file {list_file} of split {split!r} does not exist")
    ids = [line.strip() for line in _read_lines(list_file) if line.strip()]
    if not ids:
        raise DatasetError(f"split file {list_file} lists no images")
    images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    absent = [p for p in images if not p.is_file()]
    if absent:
        raise DatasetError(f"{len(absent)} images listed in {list_file} do not exist, e.g. {absent[0]}")
    return ids, images, [root / "SegmentationClass" / f"{i}.png" for i in ids]


def _ade20k(root: Path, split: str, dataset_cfg):
    images = _files(root / "images" / split, f"split {split!r}", (".jpg",))
    return [p.stem for p in images], images, [root / "annotations" / split / f"{p.stem}.png" for p in images]


def _cityscapes(root: Path, split: str, dataset_cfg):
    suffix = "_leftImg8bit"
    images = _files(root / "leftImg8bit" / split, f"split {split!r}", (".png",), f"*/*{suffix}.png")
    ids = [p.stem[: -len(suffix)] for p in images]
    labels = [
        root / "gtFine" / split / p.parent.name / f"{i}_gtFine_labelIds.png"
        for p, i in zip(images, ids, strict=True)
    ]
    return ids, images, labels


def _folder(root: Path, split: str, dataset_cfg):
    image_dir = root / str(_opt(dataset_cfg, "image_dir", "images")) / split
    label_dir = root / str(_opt(dataset_cfg, "label_dir", "labels")) / split
    images = _files(image_dir, f"split {split!r}")
    return [p.stem for p in images], images, [label_dir / f"{p.stem}.png" for p in images]


_READERS = {
    "camvid": _camvid,
    "pascal_voc_seg": _pascal_voc,
    "ade20k": _ade20k,
    "ade20k_32": _ade20k,
    "cityscapes": _cityscapes,
    "folder": _folder,
}


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err


def _read_label(path: Path) -> np.ndarray:
    """Class ids as stored: palette PNGs give their indices (not RGB colours), grayscale PNGs their values."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            values = np.asarray(img)
    except Exception as err:
        raise DatasetError(f"cannot read label {path}: {err}") from err
    if values.ndim != 2:
        raise DatasetError(
            f"label {path} has mode {mode}; expected a single-channel (L or P palette) PNG of class ids"
        )
    if values.dtype != np.uint8:
        if values.min() < 0 or values.max() > 255:
            raise DatasetError(
                f"label {path} has values {values.min()}..{values.max()}; class ids must fit in 0..255"
            )
        values = values.astype(np.uint8)
    return values


# -------------------------------------------------------------------------------------------- synthetic


def _synthetic_split(dataset_cfg, split: str, num_classes: int, ignore_label: int) -> SegmentationSplit:
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
    return SegmentationSplit(
        name="synthetic",
        split=split,
        num_classes=num_classes,
        ignore_label=ignore_label,
        class_names=_class_names(dataset_cfg, num_classes, None),
        image_ids=[f"{split}_{i:05d}" for i in range(count)],
        synthetic_size=(int(size[0]), int(size[1])),
    )


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


# ---------------------------------------------------------------------------------------- preprocessing


def _resize_to_range_size(height: int, width: int, params: _Preprocessing) -> tuple[int, int]:
    """Output (h, w) of deeplab's ``resize_to_range`` (float32 arithmetic as there)."""
    if not params.resizes:
        return height, width
    f32 = np.float32
    factor = params.resize_factor
    max_size = params.max_resize_value
    if max_size is not None and factor:
        max_size = max_size - (max_size - 1) % factor
    if params.min_resize_value is not None:
        scale = f32(params.min_resize_value) / f32(min(height, width))
        new = [int(math.floor(f32(height) * scale)), int(math.floor(f32(width) * scale))]
    else:
        new = [height, width]
    if max_size is not None and max(new) > max_size:
        scale = f32(max_size) / f32(max(height, width))
        new = [int(math.floor(f32(height) * scale)), int(math.floor(f32(width) * scale))]
    if factor:
        new = [n + (factor - (n - 1) % factor) % factor for n in new]
    return max(new[0], 1), max(new[1], 1)


def _eval_size(height: int, width: int, params: _Preprocessing, what: str) -> tuple[int, int]:
    size = _resize_to_range_size(height, width, params)
    crop_h, crop_w = params.crop_size
    if size[0] > crop_h or size[1] > crop_w:
        raise DatasetError(
            f"{what} is {size[0]}x{size[1]} after resizing, larger than dataset.crop_size "
            f"{[crop_h, crop_w]}; raise dataset.crop_size or set dataset.min_resize_value/max_resize_value"
        )
    return size


def _resize(image: tf.Tensor, label: tf.Tensor | None, size) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Bilinear image (float32) and nearest label (uint8 HxW) resize with deeplab's align_corners=True."""
    image = tf.compat.v1.image.resize(
        image, size, method=tf.image.ResizeMethod.BILINEAR, align_corners=True
    )
    if label is not None:
        label = tf.compat.v1.image.resize(
            label[..., None], size, method=tf.image.ResizeMethod.NEAREST_NEIGHBOR, align_corners=True
        )[..., 0]
    return image, label


def _pad(image, label, height, width, ignore_label: int):
    """Pad at the bottom/right to at least (height, width): image with the mean pixel, label with ignore."""
    shape = tf.shape(image)
    pad_h, pad_w = tf.maximum(height - shape[0], 0), tf.maximum(width - shape[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=MEAN_PIXEL)
    if label is not None:
        label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=tf.cast(ignore_label, label.dtype))
    return image, label


def _eval_transform(image, label, size, params: _Preprocessing):
    image = tf.cast(image, tf.float32)
    if params.resizes:
        image, label = _resize(image, label, size)
    return _pad(image, label, params.crop_size[0], params.crop_size[1], params.ignore_label)


def _random_scale(seed, params: _Preprocessing) -> tf.Tensor:
    """deeplab's get_random_scale: uniform in [min, max], or uniform over the ``step``-spaced values."""
    lo, hi, step = params.min_scale_factor, params.max_scale_factor, params.scale_factor_step_size
    if step == 0:
        return tf.random.stateless_uniform([], seed, lo, hi)
    num_steps = int((hi - lo) / step + 1)
    if num_steps < 2:
        return tf.constant(lo, tf.float32)
    pick = tf.random.stateless_uniform([], seed, 0, num_steps, dtype=tf.int32)
    return lo + tf.cast(pick, tf.float32) * (hi - lo) / (num_steps - 1)


def _train_transform(image, label, size, params: _Preprocessing, seed):
    """deeplab training preprocessing: resize to range, random scale, pad, random crop, random flip."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    scale_seed, crop_y_seed, crop_x_seed, flip_seed = seeds
    image = tf.cast(image, tf.float32)
    if params.resizes:
        image, label = _resize(image, label, size)
    if params.min_scale_factor != 1.0 or params.max_scale_factor != 1.0:
        scale = _random_scale(scale_seed, params)
        scaled = tf.cast(tf.cast(tf.shape(image)[:2], tf.float32) * scale, tf.int32)
        image, label = _resize(image, label, tf.maximum(scaled, 1))
    crop_h, crop_w = params.crop_size
    image, label = _pad(image, label, crop_h, crop_w, params.ignore_label)
    shape = tf.shape(image)
    offset_y = tf.random.stateless_uniform([], crop_y_seed, 0, shape[0] - crop_h + 1, dtype=tf.int32)
    offset_x = tf.random.stateless_uniform([], crop_x_seed, 0, shape[1] - crop_w + 1, dtype=tf.int32)
    image = image[offset_y : offset_y + crop_h, offset_x : offset_x + crop_w]
    label = label[offset_y : offset_y + crop_h, offset_x : offset_x + crop_w]
    if params.flip:
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
    return image, label


def _load_for_pipeline(data: SegmentationSplit, params: _Preprocessing, training: bool, index):
    index = int(index)
    image, label = data.load(index)
    h, w = label.shape
    if training:
        size = _resize_to_range_size(h, w, params)
    else:
        size = _eval_size(h, w, params, f"image {data.describe(index)}")
    return image, label, np.array(size, np.int32)


# ------------------------------------------------------------------------------------------------ tf.data


def input_pipeline(
    data: SegmentationSplit,
    dataset_cfg,
    *,
    training: bool,
    batch_size: int,
    seed: int = 0,
    repeat: bool | None = None,
) -> tf.data.Dataset:
    """Batches of (images float32 [B, crop_h, crop_w, 3] in 0..255, labels int32 [B, crop_h, crop_w]).

    Training shuffles, augments and (by default) repeats forever, with full batches only. Evaluation is
    deterministic: resize to range, pad bottom/right to the crop, one pass, last batch may be short.
    A file that fails to decode raises ``tf.errors.InvalidArgumentError`` whose message holds the
    ``DatasetError: ...`` text naming the file.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    params = _preprocessing(dataset_cfg)
    repeat = training if repeat is None else repeat
    crop_h, crop_w = params.crop_size
    load = functools.partial(_load_for_pipeline, data, params, training)

    def example(draw, index):
        image, label, size = tf.numpy_function(
            load, [index], [tf.uint8, tf.uint8, tf.int32], stateful=False, name="decode"
        )
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        if training:
            draw_seed = tf.stack([tf.constant(seed, tf.int64), draw])
            image, label = _train_transform(image, label, size, params, draw_seed)
        else:
            image, label = _eval_transform(image, label, size, params)
        image = tf.ensure_shape(image, [crop_h, crop_w, 3])
        return image, tf.ensure_shape(tf.cast(label, tf.int32), [crop_h, crop_w])

    ds = tf.data.Dataset.range(len(data))
    if training:
        ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()  # the n-th draw seeds its own augmentation
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def cached_pipeline(
    data: SegmentationSplit,
    dataset_cfg,
    *,
    training: bool,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
) -> tf.data.Dataset:
    """The first ``num_batches`` batches of ``input_pipeline``, decoded once, then repeated from memory.

    For benchmarks: timing this against ``input_pipeline`` separates model time from input time.
    """
    ds = input_pipeline(data, dataset_cfg, training=training, batch_size=batch_size, seed=seed, repeat=True)
    ds = ds.take(num_batches).cache()
    for _ in ds:  # fill the cache now, so the first timed pass does not decode
        pass
    return ds.repeat().prefetch(tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------------- numpy eval path


def preprocess_for_eval(
    image: np.ndarray, label: np.ndarray | None, dataset_cfg
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """The eval pipeline's transform for one image: (padded image float32, padded label, valid (h, w))."""
    params = _preprocessing(dataset_cfg)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if label is not None and np.shape(label) != image.shape[:2]:
        raise DatasetError(f"label shape {np.shape(label)} does not match image shape {image.shape[:2]}")
    size = _eval_size(image.shape[0], image.shape[1], params, f"image of shape {image.shape[:2]}")
    label_in = None if label is None else tf.convert_to_tensor(np.asarray(label, np.uint8))
    padded_image, padded_label = _eval_transform(tf.convert_to_tensor(image), label_in, size, params)
    return padded_image.numpy(), None if label is None else padded_label.numpy(), size


def postprocess_labels(label_map: np.ndarray, valid_hw, original_hw) -> np.ndarray:
    """Crop a predicted HxW label map to its valid region and resize (nearest) to the original image size."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"expected an HxW label map, got shape {label_map.shape}")
    valid_h, valid_w = int(valid_hw[0]), int(valid_hw[1])
    out_h, out_w = int(original_hw[0]), int(original_hw[1])
    valid = label_map[:valid_h, :valid_w]
    return valid[np.ix_(_nearest_indices(valid_h, out_h), _nearest_indices(valid_w, out_w))]


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # TF1 resize_nearest_neighbor with align_corners=True, as deeplab resizes predictions back
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return np.minimum(np.floor(np.arange(out_size) * scale + 0.5).astype(np.int64), in_size - 1)


def iterate(dataset: tf.data.Dataset):
    """Iterate a pipeline, re-raising a reader error from inside tf.data as the DatasetError it was."""
    iterator = iter(dataset)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            text = error.message
            if "DatasetError: " not in text:
                raise
            message = text.split("DatasetError: ", 1)[1].split("\n", 1)[0]
            raise DatasetError(message) from None
