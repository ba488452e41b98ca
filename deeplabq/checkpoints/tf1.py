"""Official research/deeplab TF1 checkpoints (``model.ckpt-NNN``, name-based), both ways: the map from
our layer names to the official TF1 variable names (:func:`tf1_name_map`), which optimizer and bookkeeping
variables of such checkpoints are ignored, hints for the usual mismatches (decoder, ASPP branches, class
count, backbone widths), :func:`load_deeplab_tf1_checkpoint` and its inverse
:func:`save_deeplab_tf1_checkpoint`, which writes our weights under the official names.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow as tf  # deeplabq/__init__.py, run before this module, set TF_USE_LEGACY_KERAS
import tf_keras as keras

from deeplabq.checkpoints.common import _BACKBONE_RE, CheckpointMismatchError, LoadReport, _iter_layers
from deeplabq.errors import InputNotFoundError

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

_HEAD_RE = re.compile(
    r"^(aspp\d+|aspp\d+_(?:depthwise|pointwise)|image_pooling|concat_projection"
    r"|decoder_feature_projection\d+|decoder_decoder_conv\d+_(?:depthwise|pointwise)|logits_semantic)(_BN)?$"
)
_BN_ATTRS = ("gamma", "beta", "moving_mean", "moving_variance")


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
            raise InputNotFoundError(f"No TF checkpoint (a 'checkpoint' state file) in directory {source}")
        source = latest
    try:
        reader = tf.train.load_checkpoint(source)
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as error:
        raise InputNotFoundError(
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

