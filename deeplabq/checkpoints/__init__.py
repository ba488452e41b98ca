"""Weights in and out of a deeplabq model: official TF1 checkpoints, Keras ImageNet weights, previous runs.

Three sources, one export, one error type. Every loader first compares everything it would load with the model, and
only if all of it fits does it assign anything, so a failed load leaves the model as it was. A mismatch
raises one :class:`CheckpointMismatchError` (a ``ValueError``) that names the source and lists every
missing, unexpected and wrongly shaped variable.

``load_deeplab_tf1_checkpoint``
    An official research/deeplab checkpoint (``model.ckpt-NNN`` prefix, TF1 name-based). Our layer names
    are the TF1 scopes with ``/`` replaced by ``_`` (head) or the ``keras.applications`` names (backbone);
    :func:`tf1_name_map` translates them. Optimizer and bookkeeping variables are ignored.
``load_keras_imagenet_weights``
    ``keras.applications.MobileNetV2`` ImageNet weights (backbone only; the head keeps its initialization).
``load_run_weights``
    The weights of a previous deeplabq run (``tf.train.Checkpoint(model=model)`` files or a Keras weights
    file).
``save_deeplab_tf1_checkpoint``
    Our weights under the official TF1 names, readable by research/deeplab (``tf_initial_checkpoint``).

The package is split by concern: :mod:`.tf1` (official TF1 checkpoints, load and save), :mod:`.keras_imagenet`
(Keras ImageNet weights), :mod:`.run_weights` (previous runs), over :mod:`.keras_h5` (Keras HDF5 weights by
layer name) and :mod:`.common` (the error type, the load report, the layer walk). Import from the package:
it re-exports every public name.
"""

from deeplabq.checkpoints.common import CheckpointMismatchError, LoadReport
from deeplabq.checkpoints.keras_imagenet import KERAS_ONLY_LAYERS, load_keras_imagenet_weights
from deeplabq.checkpoints.run_weights import load_run_weights
from deeplabq.checkpoints.tf1 import (
    TF1_IGNORED_PATTERNS,
    is_tf1_ignored,
    load_deeplab_tf1_checkpoint,
    save_deeplab_tf1_checkpoint,
    tf1_name_map,
)

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "KERAS_ONLY_LAYERS",
    "TF1_IGNORED_PATTERNS",
    "is_tf1_ignored",
    "tf1_name_map",
    "load_deeplab_tf1_checkpoint",
    "save_deeplab_tf1_checkpoint",
    "load_keras_imagenet_weights",
    "load_run_weights",
]
