"""The dataset readers, one module each, and ``open_split``, which picks one by ``dataset.name``.

Every module in this package is imported here, when the package is, so that its ``@register_reader``
classes are registered before ``open_split`` looks a name up: a new dataset is one module dropped in here
(plus its ``conf/dataset/<name>.yaml``), with no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from deeplabq.data.base import DatasetError, SegmentationSplit, _cfg
from deeplabq.data.registry import get_reader

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def open_split(dataset_cfg, split: str) -> SegmentationSplit:
    """Open ``split`` of the dataset ``dataset_cfg.name``, checking the layout before any decoding."""
    name = _cfg(dataset_cfg, "name")
    num_classes = int(_cfg(dataset_cfg, "num_classes"))
    ignore_label = int(_cfg(dataset_cfg, "ignore_label"))
    if num_classes < 1:
        raise DatasetError(f"dataset.num_classes must be >= 1, got {num_classes}")
    if not 0 <= ignore_label <= 255:
        raise DatasetError(f"dataset.ignore_label must be in 0..255 (labels are 8-bit), got {ignore_label}")
    reader = get_reader(name)
    return reader.open(dataset_cfg, split, name=name, num_classes=num_classes, ignore_label=ignore_label)
