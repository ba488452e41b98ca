"""Segmentation datasets on their real on-disk layouts, DeepLab preprocessing, and the tf.data input pipeline.

``open_split(cfg.dataset, split)`` picks the reader registered under ``dataset.name`` (``readers/``, one module
per dataset, via ``registry``) and checks the layout upfront (root, split, image/label pairing).
``SegmentationSplit.load`` (``base``) decodes one example with PIL (palette PNGs keep their indices) and maps
raw label values to train ids; ``check_files(*splits)`` checks every file of the splits upfront and names all
the bad ones in one ``DatasetError``. ``input_pipeline`` (``pipeline``) decodes in parallel inside
``tf.numpy_function`` and augments with TF ops as ``research/deeplab/input_preprocess.py`` does
(``preprocessing``, which also holds ``preprocess_for_eval`` / ``postprocess_labels``, the same evaluation steps
for a model that has no pre- or post-processing inside it, a TFLite file). This package re-exports what the
rest of deeplabq uses, so ``from deeplabq import data as data_lib; data_lib.open_split(...)`` is the interface.
"""

from deeplabq.data.base import IMAGE_SUFFIXES, DatasetError, FileReader, Reader, SegmentationSplit, check_files
from deeplabq.data.pipeline import cached_pipeline, input_pipeline, iterate
from deeplabq.data.preprocessing import MEAN_PIXEL, postprocess_labels, preprocess_for_eval
from deeplabq.data.readers import open_split
from deeplabq.data.registry import get_reader, reader_names, register_reader, unregister_reader

__all__ = [
    "IMAGE_SUFFIXES",
    "MEAN_PIXEL",
    "DatasetError",
    "FileReader",
    "Reader",
    "SegmentationSplit",
    "cached_pipeline",
    "check_files",
    "get_reader",
    "input_pipeline",
    "iterate",
    "open_split",
    "postprocess_labels",
    "preprocess_for_eval",
    "reader_names",
    "register_reader",
    "unregister_reader",
]
