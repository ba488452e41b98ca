"""What a dataset reader is and returns: ``Reader``, ``FileReader``, ``SegmentationSplit``, ``DatasetError``.

A ``Reader`` opens one split of a dataset as a ``SegmentationSplit``; a ``FileReader`` does so for a dataset
of image files with label PNGs, checking the layout upfront (root, split, image/label pairing) and leaving a
subclass only to list the files and, if its raw label values are not train ids, to map them
(``label_lut``). ``SegmentationSplit.load`` decodes one example with PIL (palette PNGs keep their indices) and
maps raw label values to train ids. Nothing here knows a dataset by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self, index: int) -> str:
        return f"{self.image_paths[index]} (label {self.label_paths[index]})"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image uint8 HxWx3 RGB and label uint8 HxW in train ids (ignored pixels = ignore_label)."""
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


class Reader:
    """Opens splits of the datasets it is registered for (``deeplabq.data.registry.register_reader``)."""

    def open(self, dataset_cfg, split: str, *, name: str, num_classes: int, ignore_label: int) -> SegmentationSplit:
        """Open ``split``, raising ``DatasetError`` for a missing or empty split; the caller checked the counts."""
        raise NotImplementedError


class FileReader(Reader):
    """A dataset of image files under ``dataset.root``, each with a single-channel label PNG."""

    def files(self, root: Path, split: str, dataset_cfg) -> tuple[list[str], list[Path], list[Path]]:
        """(image ids, image paths, label paths) of ``split``; raises ``DatasetError`` on an empty split."""
        raise NotImplementedError

    def label_lut(self, dataset_cfg, ignore_label: int) -> np.ndarray | None:
        """Raw label value (0..255) -> train id; by default labels above ``dataset.max_label`` are ignored."""
        max_label = _opt(dataset_cfg, "max_label")
        if max_label is not None:
            lut = np.arange(256, dtype=np.uint8)
            lut[int(max_label) + 1 :] = ignore_label
            return lut
        return None

    def open(self, dataset_cfg, split: str, *, name: str, num_classes: int, ignore_label: int) -> SegmentationSplit:
        raw_root = _cfg(dataset_cfg, "root")
        if raw_root is None:
            raise DatasetError(f"dataset.root must be set for dataset {name!r}")
        root = Path(str(raw_root)).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError(f"dataset.root {root} does not exist or is not a directory")

        ids, images, labels = self.files(root, split, dataset_cfg)  # each raises on an empty split
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
            label_lut=self.label_lut(dataset_cfg, ignore_label),
        )


# ------------------------------------------------------------------------------------------------ files


def _files(directory: Path, what: str, suffixes=IMAGE_SUFFIXES, pattern: str = "*") -> list[Path]:
    if not directory.is_dir():
        raise DatasetError(f"{what} directory {directory} does not exist")
    files = sorted(p for p in directory.glob(pattern) if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise DatasetError(f"{what} directory {directory} has no {'/'.join(suffixes)} files")
    return files


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
