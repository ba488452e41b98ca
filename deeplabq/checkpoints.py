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
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf  # deeplabq/__init__.py, run before this module, set TF_USE_LEGACY_KERAS
import tf_keras as keras

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

# Variables of official checkpoints that are not weights of the network: the step counter, optimizer state
# (Adam's beta powers and slots, Momentum and RMSProp slots) and moving-average shadow copies.
TF1_IGNORED_PATTERNS = (
    r"^global_step$",
    r"^beta[12]_power$",
    r"/(Momentum|Adam|Adam_1|RMSProp|RMSProp_1)$",
    r"ExponentialMovingAverage",
)
_TF1_IGNORED_RE = re.compile("|".join(f"(?:{p})" for p in TF1_IGNORED_PATTERNS))

# Scopes research/deeplab calls the "last layers" (train_utils / model.get_extra_layer_scopes).
_LOGITS_SCOPES = ("logits",)
_ALL_LAST_LAYER_SCOPES = ("logits", "image_pooling", "aspp", "concat_projection", "decoder")

# Layers with weights that keras.applications.MobileNetV2 has and DeepLab does not use: the final 1x1 conv
# to 1280 channels and its batch norm (``out_relu`` follows them but has no weights) and, in files with
# the classifier, ``predictions``. DeepLab stops after block 16, so these are skipped, not an error.
KERAS_ONLY_LAYERS = ("Conv_1", "Conv_1_bn", "predictions")

# keras.applications' ImageNet weights exist for these widths; the last block's width identifies them.
_KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"

_BACKBONE_RE = re.compile(r"^(?:expanded_conv|block_(\d+))_(expand|depthwise|project)(_BN)?$")
_HEAD_RE = re.compile(
    r"^(aspp\d+|aspp\d+_(?:depthwise|pointwise)|image_pooling|concat_projection"
    r"|decoder_feature_projection\d+|decoder_decoder_conv\d+_(?:depthwise|pointwise)|logits_semantic)(_BN)?$"
)
_BN_ATTRS = ("gamma", "beta", "moving_mean", "moving_variance")
_MAX_LISTED = 40


class CheckpointMismatchError(ValueError):
    """The weights at ``source`` do not fit the model. Nothing was assigned.

    ``missing``: names the model needs that the source lacks; ``unexpected``: names in the source the
    model does not use; ``mismatched``: ``(name, source shape, model shape)``.
    """

    def __init__(
        self,
        source,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
        hints: Iterable[str] = (),
        kind: str = "checkpoint",
    ):
        self.source = str(source)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted((n, tuple(a), tuple(b)) for n, a, b in mismatched)
        self.hints = list(hints)
        lines = [f"The {kind} {self.source} does not fit the model:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}; needed by the model, not in the {kind}):")
            lines += _listed(self.missing, "missing")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}; in the {kind}, not used by the model):")
            lines += _listed(self.unexpected, "unexpected")
        if self.mismatched:
            lines.append(f"  wrong shape ({len(self.mismatched)}; name: {kind} shape vs model shape):")
            lines += _listed([f"{n}: {list(a)} vs {list(b)}" for n, a, b in self.mismatched], "mismatched")
        lines += [f"  hint: {h}" for h in self.hints]
        lines.append("Nothing was loaded; the model's weights are unchanged.")
        super().__init__("\n".join(lines))


def _listed(items: list[str], attribute: str) -> list[str]:
    shown = [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"    ... and {len(items) - _MAX_LISTED} more (all in the exception's .{attribute})")
    return shown


@dataclass
class LoadReport:
    """What a loader did. ``loaded``: model weights assigned (source names); ``skipped``: model weights
    deliberately left as they were; ``ignored``: source entries deliberately not used."""

    source: str
    loaded: list[str]
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} weights from {self.source}; {len(self.skipped)} model weights kept "
            f"their values; {len(self.ignored)} entries of the source ignored"
        )


# --------------------------------------------------------------------------------------------------------
# Official TF1 checkpoints
# --------------------------------------------------------------------------------------------------------


def _iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer)
        else:
            yield layer


def _tf1_scope(layer_name: str) -> str | None:
    """TF1 variable scope of one of our layers, or None if the layer has no official counterpart."""
    if layer_name == "Conv1":
        return "MobilenetV2/Conv"
    if layer_name == "bn_Conv1":
        return "MobilenetV2/Conv/BatchNorm"
    match = _BACKBONE_RE.match(layer_name)
    if match:
        index, op, bn = match.groups()
        block = "expanded_conv" if index is None else f"expanded_conv_{index}"
        return f"MobilenetV2/{block}/{op}" + ("/BatchNorm" if bn else "")
    match = _HEAD_RE.match(layer_name)
    if match:
        base, bn = match.groups()
        if base == "logits_semantic":
            scope = "logits/semantic"
        elif base.startswith("decoder_"):
            scope = "decoder/" + base[len("decoder_"):]
        else:
            scope = base
        return scope + ("/BatchNorm" if bn else "")
    return None


def _layer_tf1_variables(layer, scope: str) -> dict[str, tf.Variable]:
    if isinstance(layer, keras.layers.BatchNormalization):
        pairs = [(attr, getattr(layer, attr, None)) for attr in _BN_ATTRS]
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        pairs = [("depthwise_weights", layer.depthwise_kernel), ("biases", layer.bias)]
    elif isinstance(layer, keras.layers.Conv2D):
        pairs = [("weights", layer.kernel), ("biases", layer.bias)]
    else:
        return {}
    return {f"{scope}/{name}": var for name, var in pairs if var is not None}


def tf1_name_map(model: keras.Model) -> dict[str, tf.Variable]:
    """Official research/deeplab TF1 variable name -> our Keras variable, for every weight of ``model``.

    Shapes agree as they are (TF1 conv weights are ``[kh, kw, in, out]``, depthwise ``[kh, kw, in, 1]``, as
    in Keras). Keras block ``i`` is TF1 ``expanded_conv_i`` (block 0 is ``expanded_conv``); head layers are
    the TF1 scopes with ``/`` replaced by ``_``. Raises ValueError if a layer with weights has no TF1 name
    (e.g. a tfmot-wrapped model: load official weights into the float model before quantizing).
    """
    names: dict[str, tf.Variable] = {}
    unnamed = []
    for layer in _iter_layers(model):
        if not layer.weights:
            continue
        scope = _tf1_scope(layer.name)
        variables = _layer_tf1_variables(layer, scope) if scope else {}
        covered = {id(v) for v in variables.values()}
        if not variables or any(id(w) not in covered for w in layer.weights):
            unnamed.append(f"{layer.name} ({type(layer).__name__})")
            continue
        names.update(variables)
    if unnamed:
        raise ValueError(
            "These layers have weights without an official TF1 name: " + ", ".join(unnamed)
            + ". tf1_name_map works on the float model of deeplabq.model.build_deeplab."
        )
    return names


def is_tf1_ignored(name: str) -> bool:
    """True for optimizer / bookkeeping variables of TF1 checkpoints (never weights of the network)."""
    return bool(_TF1_IGNORED_RE.search(name))


def _tf1_hints(missing: list[str], unexpected: list[str], mismatched: list[tuple]) -> list[str]:
    hints = []
    has = lambda names, prefix: any(n.startswith(prefix) for n in names)  # noqa: E731
    if has(unexpected, "decoder/") and not has(missing, "decoder/"):
        hints.append("the checkpoint is DeepLabv3+ (it has decoder/*): set head.decoder_output_stride=4")
    if has(missing, "decoder/") and not has(unexpected, "decoder/"):
        hints.append("the checkpoint has no decoder (DeepLabv3): set head.decoder_output_stride=null")
    aspp = re.compile(r"^aspp([1-9]\d*)_")
    ckpt_rates = {aspp.match(n).group(1) for n in unexpected if aspp.match(n)}
    model_rates = {aspp.match(n).group(1) for n in missing if aspp.match(n)}
    if ckpt_rates or model_rates:
        hints.append(
            "the number of atrous ASPP branches differs: head.atrous_rates needs one rate per aspp{i}_* "
            "branch of the checkpoint (official 3-branch models use [6, 12, 18] at output stride 16)"
        )
    shape_names = [m[0] for m in mismatched]
    if shape_names and all(n.startswith("logits/") for n in shape_names):
        hints.append(
            "only the logits differ (another class count): pass initialize_last_layer=False to keep "
            "freshly initialized logits"
        )
    elif any(n.startswith("MobilenetV2/") for n in shape_names):
        hints.append(
            "the backbone widths differ: backbone.depth_multiplier must be the checkpoint's, and official "
            "checkpoints need backbone.divisible_by=null (research/deeplab's channel rounding)"
        )
    return hints


def load_deeplab_tf1_checkpoint(
    model: keras.Model,
    ckpt_prefix: str | os.PathLike,
    initialize_last_layer: bool = True,
    last_layers_contain_logits_only: bool = True,
) -> LoadReport:
    """Load an official research/deeplab TF1 checkpoint (``.../model.ckpt-NNN`` prefix or its directory).

    Every model weight must be in the checkpoint with the same shape and every checkpoint variable must be
    used, except the ignored optimizer / bookkeeping ones (:data:`TF1_IGNORED_PATTERNS`). Otherwise one
    :class:`CheckpointMismatchError` lists all differences and nothing is assigned.

    ``initialize_last_layer=False`` (deeplab's flag for fine-tuning to another class count) leaves the last
    layers as they are and ignores them in the checkpoint. Which layers are "last" follows deeplab's
    ``last_layers_contain_logits_only``, but with the default True here: only ``logits/semantic``. With
    False, the whole head (image_pooling, aspp*, concat_projection, decoder, logits) is skipped as in
    deeplab's default.
    """
    source = os.fspath(ckpt_prefix)
    if os.path.isdir(source):
        latest = tf.train.latest_checkpoint(source)
        if latest is None:
            raise FileNotFoundError(f"No TF checkpoint (a 'checkpoint' state file) in directory {source}")
        source = latest
    try:
        reader = tf.train.load_checkpoint(source)
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as error:
        raise FileNotFoundError(
            f"Cannot read a TF checkpoint at {source} (expected a prefix like .../model.ckpt-30000 with "
            f"its .index and .data-* files): {error}"
        ) from error
    ckpt_shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
    if "_CHECKPOINTABLE_OBJECT_GRAPH" in ckpt_shapes:
        raise CheckpointMismatchError(
            source,
            hints=["this is a TF2 object-based checkpoint (e.g. of a deeplabq run), not an official TF1 "
                   "one: use load_run_weights"],
        )

    last_scopes = _LOGITS_SCOPES if last_layers_contain_logits_only else _ALL_LAST_LAYER_SCOPES
    is_last = lambda name: not initialize_last_layer and name.startswith(last_scopes)  # noqa: E731
    name_map = tf1_name_map(model)
    wanted = {name: var for name, var in name_map.items() if not is_last(name)}
    skipped = sorted(name for name in name_map if is_last(name))
    ignored = {name for name in ckpt_shapes if is_tf1_ignored(name) or is_last(name)}
    available = {name: shape for name, shape in ckpt_shapes.items() if name not in ignored}

    missing = sorted(set(wanted) - set(available))
    unexpected = sorted(set(available) - set(wanted))
    mismatched = [
        (name, available[name], tuple(var.shape))
        for name, var in wanted.items()
        if name in available and available[name] != tuple(var.shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            source, missing=missing, unexpected=unexpected, mismatched=mismatched,
            hints=_tf1_hints(missing, unexpected, mismatched),
        )
    values = {name: reader.get_tensor(name) for name in wanted}  # read all before assigning any
    for name, var in wanted.items():
        var.assign(np.asarray(values[name], dtype=var.dtype.as_numpy_dtype))
    return LoadReport(source=source, loaded=sorted(wanted), skipped=skipped, ignored=sorted(ignored))


def save_deeplab_tf1_checkpoint(model: keras.Model, prefix: str | os.PathLike) -> str:
    """Write the model's weights under the official TF1 names (``prefix.index`` + ``prefix.data-*``).

    The result reads like an official checkpoint: with :func:`load_deeplab_tf1_checkpoint`,
    ``tf.train.load_checkpoint`` or as research/deeplab's ``tf_initial_checkpoint``. No optimizer state or
    global step is written, and no ``checkpoint`` state file. Returns the prefix.
    """
    prefix = os.path.abspath(os.path.expanduser(os.fspath(prefix)))
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    names = tf1_name_map(model)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=list(names),
        shape_and_slices=[""] * len(names),
        tensors=[tf.convert_to_tensor(var) for var in names.values()],
    )
    return prefix


# --------------------------------------------------------------------------------------------------------
# Keras HDF5 weights (keras.applications ImageNet weights, tf_keras save_weights("*.h5"))
# --------------------------------------------------------------------------------------------------------


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
            raise ValueError(
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


def _is_keras_backbone_layer(name: str) -> bool:
    return name in ("Conv1", "bn_Conv1") or bool(_BACKBONE_RE.match(name))


def _keras_alpha(model: keras.Model) -> float:
    """keras.applications ``alpha`` with the model's last block width (320 x alpha, same in both roundings)."""
    layer = model.get_layer("block_16_project")
    by_width = {round(320 * alpha): alpha for alpha in _KERAS_ALPHAS}
    if layer.filters not in by_width:
        raise ValueError(
            f"keras.applications has ImageNet weights for MobileNetV2 alpha in {list(_KERAS_ALPHAS)}; this "
            f"model's last block has {layer.filters} channels (320 x depth multiplier), which is none of them"
        )
    return by_width[layer.filters]


def load_keras_imagenet_weights(
    model: keras.Model, source: str | os.PathLike, depth_multiplier: float | None = None
) -> LoadReport:
    """Load keras.applications MobileNetV2 ImageNet weights into the backbone of ``model`` (by layer name).

    ``source`` is a local Keras HDF5 file such as ``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_
    224_no_top.h5`` or ``"imagenet"``, which lets ``keras.applications.MobileNetV2(weights="imagenet")``
    download (or take from ``~/.keras/models``) the 224x224 no-top weights for ``depth_multiplier``
    (default: read off the model). The head keeps its values (reported as ``skipped``).

    keras' ``Conv_1``/``Conv_1_bn`` (the final 1280-channel conv, followed by ``out_relu``) and
    ``predictions`` are not part of DeepLab, which stops after block 16: they are ``ignored``, not an
    error. Every backbone weight of ours must be in the file with the same shape, otherwise one
    :class:`CheckpointMismatchError` lists the differences and nothing is assigned. Keras rounds every
    width to a multiple of 8, research/deeplab does not at depth multiplier != 1.0: build the model with
    ``backbone.divisible_by=8`` to use Keras weights at dm 0.5 etc.
    """
    model_layers = {
        layer.name: layer for layer in _iter_layers(model) if layer.weights and _is_keras_backbone_layer(layer.name)
    }
    if not model_layers:
        raise ValueError("The model has no MobileNetV2 backbone layers with keras.applications names")
    if isinstance(source, str) and source == "imagenet":
        alpha = depth_multiplier if depth_multiplier is not None else _keras_alpha(model)
        if float(alpha) not in _KERAS_ALPHAS:
            raise ValueError(f"keras.applications has no ImageNet MobileNetV2 weights for alpha={alpha}")
        file_name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_224_no_top.h5"
        try:
            keras_model = keras.applications.MobileNetV2(
                input_shape=(224, 224, 3), alpha=float(alpha), include_top=False, weights="imagenet"
            )
        except Exception as error:  # noqa: BLE001  (get_file raises a bare Exception when offline)
            raise OSError(
                f"Could not get the keras.applications MobileNetV2 ImageNet weights (alpha={float(alpha)}): "
                f"{error}. Without network access, download {_KERAS_WEIGHTS_URL}{file_name} elsewhere and "
                f"pass the local .h5 path instead of 'imagenet' (or place it in ~/.keras/models/)."
            ) from error
        source_name = f"keras.applications MobileNetV2 ImageNet weights ({file_name})"
        source_layers = {
            layer.name: dict(zip(_weight_keys([w.name for w in layer.weights]), layer.get_weights(), strict=True))
            for layer in keras_model.layers
            if layer.weights
        }
    else:
        path = os.path.expanduser(os.fspath(source))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No Keras weights file at {path}; pass a keras.applications MobileNetV2 .h5 file (e.g. "
                f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5) or 'imagenet'"
            )
        source_name = path
        source_layers = _read_layered_h5(path)

    if depth_multiplier is None and "block_16_project" in model_layers:
        depth_multiplier = round(model_layers["block_16_project"].filters / 320, 3)
    hints = [
        "keras.applications rounds every channel count to a multiple of 8, research/deeplab does not at "
        "depth multiplier != 1.0: set backbone.divisible_by=8 to use Keras weights; also check that the "
        f"file's alpha equals backbone.depth_multiplier (the model's is {depth_multiplier})"
    ]
    loaded, ignored = _assign_by_layer_name(
        model_layers, source_layers, source_name, allowed_unused=KERAS_ONLY_LAYERS, kind="weights file",
        hints=hints,
    )
    skipped = sorted(
        f"{layer.name}/{_short_name(w.name)}"
        for layer in _iter_layers(model)
        if layer.name not in model_layers
        for w in layer.weights
    )
    return LoadReport(source=source_name, loaded=loaded, skipped=skipped, ignored=ignored)


# --------------------------------------------------------------------------------------------------------
# Weights of a previous deeplabq run
# --------------------------------------------------------------------------------------------------------

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
            raise FileNotFoundError(f"No Keras weights file at {path}")
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
            raise FileNotFoundError(
                f"No TF checkpoint in {directory} (expected the 'checkpoint' state file and ckpt-N.* files "
                f"that deeplabq's trainer writes under <run_dir>/checkpoints/)"
            )
    elif not os.path.exists(prefix + ".index"):
        raise FileNotFoundError(
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
