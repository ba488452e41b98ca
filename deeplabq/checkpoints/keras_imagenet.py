"""keras.applications MobileNetV2 ImageNet weights in the backbone of a deeplabq model: which layers are
the backbone's, which Keras-only layers of the file are ignored, the ``alpha`` (depth multiplier) of the
weights, and :func:`load_keras_imagenet_weights`, which takes a local ``.h5`` file or lets keras.applications
fetch the weights.
"""

from __future__ import annotations

import os

import tf_keras as keras

from deeplabq.checkpoints.common import _BACKBONE_RE, LoadReport, _iter_layers
from deeplabq.checkpoints.keras_h5 import _assign_by_layer_name, _read_layered_h5, _short_name, _weight_keys
from deeplabq.errors import ConfigError, InputNotFoundError

# Layers with weights that keras.applications.MobileNetV2 has and DeepLab does not use: the final 1x1 conv
# to 1280 channels and its batch norm (``out_relu`` follows them but has no weights) and, in files with
# the classifier, ``predictions``. DeepLab stops after block 16, so these are skipped, not an error.
KERAS_ONLY_LAYERS = ("Conv_1", "Conv_1_bn", "predictions")

# keras.applications' ImageNet weights exist for these widths; the last block's width identifies them.
_KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
_KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


def _is_keras_backbone_layer(name: str) -> bool:
    return name in ("Conv1", "bn_Conv1") or bool(_BACKBONE_RE.match(name))


def _keras_alpha(model: keras.Model) -> float:
    """keras.applications ``alpha`` with the model's last block width (320 x alpha, same in both roundings)."""
    layer = model.get_layer("block_16_project")
    by_width = {round(320 * alpha): alpha for alpha in _KERAS_ALPHAS}
    if layer.filters not in by_width:
        raise ConfigError(
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
            raise ConfigError(f"keras.applications has no ImageNet MobileNetV2 weights for alpha={alpha}")
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
            raise InputNotFoundError(
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

