"""Keras HDF5 weights files read and assigned by layer name: the by-layer-name layout of tf_keras / Keras 2
(keras.applications' ImageNet ``.h5`` files, ``model.save_weights("*.h5")``), how the weights of one layer are
keyed, and the check-then-assign step shared by the Keras ImageNet loader and the ``.h5`` branch of
:func:`~deeplabq.checkpoints.load_run_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import tf_keras as keras

from deeplabq.checkpoints.common import CheckpointMismatchError
from deeplabq.errors import SourceError


def _short_name(weight_name: str) -> str:
    """'block_1_expand_BN/gamma:0' -> 'gamma'."""
    return weight_name.split("/")[-1].split(":")[0]


def _read_layered_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {weight key (see _weight_keys): value} of a tf_keras / Keras 2 HDF5 weights file, in
    the file's layer order."""
    import h5py

    def decode(values):
        return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]

    with h5py.File(path, "r") as file:
        root = file
        if "layer_names" not in root.attrs and "model_weights" in root:
            root = root["model_weights"]  # a whole model saved with model.save("*.h5")
        if "layer_names" not in root.attrs:
            raise SourceError(
                f"{path} is not a Keras 2 / tf_keras HDF5 weights file (no 'layer_names'); expected e.g. "
                "keras.applications' mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
            )
        layers = {}
        for layer_name in decode(root.attrs["layer_names"]):
            group = root[layer_name]
            names = decode(group.attrs.get("weight_names", []))
            if names:
                layers[layer_name] = dict(zip(_weight_keys(names), (np.asarray(group[n]) for n in names), strict=True))
    return layers


def _weight_keys(weight_names: list[str]) -> list[str]:
    """How weights of one layer are matched: by short name ('gamma'), or by full name where short names
    repeat within the layer."""
    short = [_short_name(name) for name in weight_names]
    if len(set(short)) == len(short):
        return short
    return [name.split(":")[0] for name in weight_names]


def _assign_by_layer_name(
    model_layers: dict[str, keras.layers.Layer],
    source_layers: dict[str, dict[str, np.ndarray]],
    source: str,
    *,
    allowed_unused: Iterable[str] = (),
    kind: str,
    hints: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """Check, then assign source weights to ``model_layers`` by layer and weight name. Returns (loaded,
    ignored) as 'layer/weight' names."""
    allowed_unused = set(allowed_unused)
    missing, mismatched, pending = [], [], []
    used = {}
    for layer_name, layer in model_layers.items():
        values = source_layers.get(layer_name, {})
        keys = _weight_keys([var.name for var in layer.weights])
        used[layer_name] = set(keys)
        for key, var in zip(keys, layer.weights, strict=True):
            name = f"{layer_name}/{key}"
            value = values.get(key)
            if value is None:
                missing.append(name)
            elif tuple(value.shape) != tuple(var.shape):
                mismatched.append((name, tuple(value.shape), tuple(var.shape)))
            else:
                pending.append((name, var, value))
    unexpected, ignored = [], []
    for layer_name, values in source_layers.items():
        for key in values:
            if key in used.get(layer_name, ()):
                continue
            (ignored if layer_name in allowed_unused else unexpected).append(f"{layer_name}/{key}")
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            source, missing=missing, unexpected=unexpected, mismatched=mismatched,
            hints=hints if mismatched else (), kind=kind,
        )
    for _, var, value in pending:
        var.assign(value.astype(var.dtype.as_numpy_dtype))
    return sorted(name for name, _, _ in pending), sorted(ignored)
