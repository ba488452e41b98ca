"""The weights of a previous deeplabq run back into a model: :func:`load_run_weights` reads the trainer's
object-based ``tf.train.Checkpoint(model=model)`` checkpoints (or ``model.save_weights`` prefixes) and Keras
weights files (``*.weights.h5``, other ``*.h5``), compares their variables with the model's, pairs variables
renamed only by auto-generated layer names (tfmot's ``quantize_layer_<n>``) and restores all or nothing.
"""

from __future__ import annotations

import os
import re
import tempfile

import tensorflow as tf  # deeplabq/__init__.py, run before this module, set TF_USE_LEGACY_KERAS
import tf_keras as keras

from deeplabq.checkpoints.common import CheckpointMismatchError, LoadReport, _iter_layers
from deeplabq.checkpoints.keras_h5 import _assign_by_layer_name, _read_layered_h5, _short_name, _weight_keys
from deeplabq.errors import InputNotFoundError

_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_NUMBER_SUFFIX = re.compile(r"_\d+(?=_|$)")


def _variable_keys(prefix: str, root: str) -> dict[str, tuple]:
    """Model variables of an object-based checkpoint: key relative to the model -> shape."""
    keys = {}
    for key, shape in tf.train.list_variables(prefix):
        if ".OPTIMIZER_SLOT" in key or not key.endswith(_VALUE_SUFFIX):
            continue
        if root:
            if not key.startswith(root + "/"):
                continue
            key = key[len(root) + 1:]
        keys[key.removesuffix(_VALUE_SUFFIX)] = tuple(shape)
    return keys


def _resolve_key(model: keras.Model, key: str) -> tf.Variable | None:
    """The model variable of a checkpoint key like 'layer_with_weights-7/kernel' or
    'layer_with_weights-7/layer/kernel' (a tfmot wrapper), or None if that is not certain."""
    match = re.fullmatch(r"layer_with_weights-(\d+)/(.+)", key)
    weighted = [layer for layer in model.layers if layer.weights]
    if not match or int(match.group(1)) >= len(weighted):
        return None
    obj = weighted[int(match.group(1))]
    *path, attribute = match.group(2).split("/")
    for part in path:
        obj = getattr(obj, part, None)
    var = getattr(obj, attribute, None)
    if isinstance(var, tf.Variable):
        return var
    candidates = [w for w in getattr(obj, "weights", []) if _short_name(w.name) == attribute]
    return candidates[0] if len(candidates) == 1 else None


def _label(model: keras.Model, key: str) -> str:
    var = _resolve_key(model, key)
    return f"{key} ({var.name.split(':')[0]})" if var is not None else key


def _renamed_pairs(model, missing: list[str], unexpected: list[str], expected, found) -> dict[str, str]:
    """Model key -> checkpoint key for variables whose checkpoint name embeds an auto-generated layer name.

    tfmot's input ``QuantizeLayer`` names its variables after itself (``quantize_layer_max``), and Keras
    numbers auto-named layers per process (``quantize_layer_1`` for the second QAT model built), so the
    same variable can have another key in the checkpoint. Pairs only where that is unambiguous: the keys
    differ only by ``_<n>`` suffixes in their last part, shapes agree and the variable resolves.
    """
    def canonical(key):
        head, _, last = key.rpartition("/")
        return head + "/" + _NUMBER_SUFFIX.sub("", last)

    by_canonical = {}
    for key in unexpected:
        by_canonical.setdefault(canonical(key), []).append(key)
    model_side = {}
    for key in missing:
        model_side.setdefault(canonical(key), []).append(key)
    pairs = {}
    for name, keys in model_side.items():
        candidates = by_canonical.get(name, [])
        if len(keys) == 1 and len(candidates) == 1 and expected[keys[0]] == found[candidates[0]]:
            if _resolve_key(model, keys[0]) is not None:
                pairs[keys[0]] = candidates[0]
    return pairs


def _compare_keys(model, expected: dict[str, tuple], found: dict[str, tuple], source: str, kind: str,
                  allow_renamed: bool = False) -> dict[str, str]:
    """Raise CheckpointMismatchError unless ``found`` has exactly the ``expected`` keys and shapes; returns
    the pairs of renamed keys (model key -> checkpoint key) it accepted (see _renamed_pairs)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    pairs = _renamed_pairs(model, missing, unexpected, expected, found) if allow_renamed else {}
    missing = [k for k in missing if k not in pairs]
    unexpected = [k for k in unexpected if k not in set(pairs.values())]
    mismatched = [(_label(model, k), found[k], s) for k, s in expected.items() if k in found and found[k] != s]
    if missing or unexpected or mismatched:
        hints = ["the run's model was built with another architecture (dataset.num_classes, backbone.*, "
                 "head.*, quantization): use the same config as that run"]
        wrapped = lambda keys: any("/layer/" in k or k.endswith("optimizer_step") for k in keys)  # noqa: E731
        if wrapped(found) and not wrapped(expected):
            hints.append("the weights are of a quantization-aware (tfmot-wrapped) model: quantize the model "
                         "(deeplabq.quantization.quantize_model) before loading")
        elif wrapped(expected) and not wrapped(found):
            hints.append("the weights are of a float model and this model is quantization-aware: load them "
                         "into the float model, then quantize it")
        raise CheckpointMismatchError(
            source, missing=[_label(model, k) for k in missing], unexpected=unexpected, mismatched=mismatched,
            hints=hints, kind=kind,
        )
    return pairs


def _align_renamed_layers(model_layers: dict, source_layers: dict) -> dict:
    """Source layers renamed to the model's where only auto-generated names differ.

    With as many weighted layers on both sides, a source layer whose name differs from the model layer at
    the same position (e.g. tfmot's ``quantize_layer`` vs ``quantize_layer_1``: Keras numbers auto-named
    layers per process) takes the model layer's name, and its weights the model's weight keys if they are
    as many. Shapes are still checked; any other difference is still reported.
    """
    if len(model_layers) != len(source_layers):
        return source_layers
    aligned = {}
    for (name, layer), (source_name, values) in zip(model_layers.items(), source_layers.items(), strict=True):
        if source_name == name or source_name in model_layers or name in source_layers:
            aligned[source_name] = values
            continue
        keys = _weight_keys([var.name for var in layer.weights])
        if len(keys) == len(values):
            aligned[name] = dict(zip(keys, values.values(), strict=True))
        else:
            aligned[source_name] = values
    return aligned


def _h5_dataset_shapes(path: str) -> dict[str, tuple]:
    import h5py

    shapes = {}
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, obj: shapes.__setitem__(name, tuple(obj.shape)) if isinstance(obj, h5py.Dataset) else None
        )
    return shapes


def _restore_all_or_nothing(model: keras.Model, restore, source: str) -> None:
    snapshot = [var.numpy() for var in model.weights]
    try:
        restore()
    except Exception as error:  # roll back, then report as a mismatch
        for var, value in zip(model.weights, snapshot, strict=True):
            var.assign(value)
        raise CheckpointMismatchError(source, hints=[f"restoring failed: {error}"]) from error


def load_run_weights(model: keras.Model, path: str | os.PathLike) -> LoadReport:
    """Initialize ``model`` from a previous deeplabq run (same architecture, float or QAT-wrapped).

    ``path`` is one of: a run directory with ``checkpoints/`` (latest ``tf.train.Checkpoint(model=model,
    ...)`` there), a checkpoint directory, a checkpoint prefix (``.../ckpt-12``; ``model.save_weights``
    TF-format prefixes work too), or a Keras weights file (``*.weights.h5`` in the Keras v3 layout, other
    ``*.h5``/``*.hdf5`` in the HDF5 by-layer-name layout). Optimizer state and other non-model objects in
    the checkpoint are ignored. Every model variable must be in it with the same shape and no extra model
    variable may be: otherwise one :class:`CheckpointMismatchError` naming ``path`` and nothing is
    assigned.
    """
    path = os.path.expanduser(os.fspath(path))
    if path.endswith((".h5", ".hdf5")):
        if not os.path.isfile(path):
            raise InputNotFoundError(f"No Keras weights file at {path}")
        if path.endswith(".weights.h5"):
            return _load_keras_v3_weights(model, path)
        layers = {layer.name: layer for layer in _iter_layers(model) if layer.weights}
        source_layers = _align_renamed_layers(layers, _read_layered_h5(path))
        loaded, _ = _assign_by_layer_name(layers, source_layers, path, kind="weights file")
        return LoadReport(source=path, loaded=loaded)

    prefix = path
    if os.path.isdir(path):
        directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        prefix = tf.train.latest_checkpoint(directory)
        if prefix is None:
            raise InputNotFoundError(
                f"No TF checkpoint in {directory} (expected the 'checkpoint' state file and ckpt-N.* files "
                f"that deeplabq's trainer writes under <run_dir>/checkpoints/)"
            )
    elif not os.path.exists(prefix + ".index"):
        raise InputNotFoundError(
            f"No checkpoint at {path}: expected a run directory, a checkpoint directory, a prefix with a "
            f"'.index' file, or a .h5 / .weights.h5 Keras weights file"
        )

    names = {key for key, _ in tf.train.list_variables(prefix)}
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in names:
        raise CheckpointMismatchError(
            prefix,
            hints=["this is a TF1 name-based checkpoint (e.g. an official DeepLab one): use "
                   "load_deeplab_tf1_checkpoint"],
        )
    # tf.train.Checkpoint(model=model) nests the model under "model/"; model.save_weights makes it the root.
    root = "model" if any(key.startswith("model/") for key in names) else ""
    found = _variable_keys(prefix, root)
    with tempfile.TemporaryDirectory() as tmp:
        reference = tf.train.Checkpoint(model=model).write(os.path.join(tmp, "reference"))
        expected = _variable_keys(reference, "model")
    renamed = _compare_keys(model, expected, found, prefix, "checkpoint", allow_renamed=True)

    def restore():
        checkpoint = tf.train.Checkpoint(model=model) if root else tf.train.Checkpoint(root=model)
        status = checkpoint.read(prefix)
        status.expect_partial()
        if not renamed:  # renamed variables are not matched by TF; they are assigned below
            status.assert_existing_objects_matched()
        reader = tf.train.load_checkpoint(prefix)
        for model_key, ckpt_key in renamed.items():
            full_key = f"{root}/{ckpt_key}" if root else ckpt_key
            _resolve_key(model, model_key).assign(reader.get_tensor(full_key + _VALUE_SUFFIX))

    _restore_all_or_nothing(model, restore, prefix)
    return LoadReport(source=prefix, loaded=sorted(_label(model, key) for key in expected))


def _load_keras_v3_weights(model: keras.Model, path: str) -> LoadReport:
    found = _h5_dataset_shapes(path)
    with tempfile.TemporaryDirectory() as tmp:
        reference = os.path.join(tmp, "reference.weights.h5")
        model.save_weights(reference)
        expected = _h5_dataset_shapes(reference)
    _compare_keys(model, expected, found, path, "weights file")
    _restore_all_or_nothing(model, lambda: model.load_weights(path), path)
    return LoadReport(source=path, loaded=sorted(expected))
