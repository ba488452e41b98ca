"""Cityscapes: ``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine/.../*_gtFine_labelIds.png``.

The label files hold Cityscapes labelIds; this reader maps the 19 evaluated ones to their train ids
(0..18) and every other labelId to the ignore label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deeplabq.data.base import FileReader, _files
from deeplabq.data.registry import register_reader

# cityscapesscripts labels.py: the labelIds of the 19 evaluated classes, trainId = position; others ignored.
CITYSCAPES_EVAL_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


@register_reader("cityscapes")
class Cityscapes(FileReader):
    def files(self, root: Path, split: str, dataset_cfg):
        suffix = "_leftImg8bit"
        images = _files(root / "leftImg8bit" / split, f"split {split!r}", (".png",), f"*/*{suffix}.png")
        ids = [p.stem[: -len(suffix)] for p in images]
        labels = [
            root / "gtFine" / split / p.parent.name / f"{i}_gtFine_labelIds.png"
            for p, i in zip(images, ids, strict=True)
        ]
        return ids, images, labels

    def label_lut(self, dataset_cfg, ignore_label: int) -> np.ndarray:
        lut = np.full(256, ignore_label, np.uint8)
        lut[list(CITYSCAPES_EVAL_LABEL_IDS)] = np.arange(len(CITYSCAPES_EVAL_LABEL_IDS))
        return lut
