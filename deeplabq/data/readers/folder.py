"""Any dataset laid out as ``<root>/<image_dir>/<split>/*.{jpg,png}`` and ``<root>/<label_dir>/<split>/<stem>.png``.

Labels are single-channel class ids (``dataset.max_label`` may send ids above it to the ignore label); class
names come from ``dataset.class_names`` or from ``<root>/classes.txt`` (one per line).
"""

from __future__ import annotations

from pathlib import Path

from deeplabq.data.base import FileReader, _files, _opt
from deeplabq.data.registry import register_reader


@register_reader("folder")
class Folder(FileReader):
    def files(self, root: Path, split: str, dataset_cfg):
        image_dir = root / str(_opt(dataset_cfg, "image_dir", "images")) / split
        label_dir = root / str(_opt(dataset_cfg, "label_dir", "labels")) / split
        images = _files(image_dir, f"split {split!r}")
        return [p.stem for p in images], images, [label_dir / f"{p.stem}.png" for p in images]
