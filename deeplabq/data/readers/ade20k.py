"""ADE20K scene parsing: ``<root>/images/<split>/*.jpg``, ``<root>/annotations/<split>/<stem>.png``.

Serves ``ade20k`` (150 classes + 0, "other", ignored) and ``ade20k_32`` (MLPerf's 32 outputs): the same
files, told apart by their configs; ``dataset.max_label`` (the ``FileReader`` default label mapping) sends
ids above it to the ignore label.
"""

from __future__ import annotations

from pathlib import Path

from deeplabq.data.base import FileReader, _files
from deeplabq.data.registry import register_reader


@register_reader("ade20k")
@register_reader("ade20k_32")
class Ade20k(FileReader):
    def files(self, root: Path, split: str, dataset_cfg):
        images = _files(root / "images" / split, f"split {split!r}", (".jpg",))
        return [p.stem for p in images], images, [root / "annotations" / split / f"{p.stem}.png" for p in images]
