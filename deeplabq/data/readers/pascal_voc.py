"""PASCAL VOC 2012 segmentation: ``<root>/JPEGImages/*.jpg``, ``<root>/SegmentationClass/*.png`` (palette).

A split is the list ``<root>/ImageSets/Segmentation/<split>.txt``; palette indices are the class ids and 255
the ignored border, so no label mapping is needed.
"""

from __future__ import annotations

from pathlib import Path

from deeplabq.data.base import DatasetError, FileReader, _read_lines
from deeplabq.data.registry import register_reader


@register_reader("pascal_voc_seg")
class PascalVoc(FileReader):
    def files(self, root: Path, split: str, dataset_cfg):
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
