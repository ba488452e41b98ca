"""DeepLab's preprocessing: the eval and train transforms, resize-to-range, padding, and their numpy eval path.

``_preprocessing`` turns the ``dataset`` config into the typed ``_Preprocessing`` spec once; the TF transforms
augment as ``research/deeplab/input_preprocess.py`` does. ``preprocess_for_eval`` / ``postprocess_labels``
are the same evaluation steps for a model that has no pre- or post-processing inside it (a TFLite file).

Faithfulness notes:
- Resizing follows deeplab's ``preprocess_utils.resize_to_range`` exactly, including its rounding: with a
  ``resize_factor`` the long-side limit becomes ``max - (max - 1) % factor`` and both sides are rounded *up*
  to a multiple of the factor plus one (so min=max=512, factor 16 gives at most 497 pixels). With only
  ``max_resize_value`` set, images are shrunk to fit and never enlarged (deeplab requires a min value).
- Resizes use TF1's ``align_corners=True`` like deeplab (bilinear for images, nearest for labels), in the
  pipeline and in ``preprocess_for_eval`` alike, so both evaluation paths see identical inputs.
- Random choices are stateless, seeded by ``(seed, n)`` for the n-th example drawn, so augmentation does not
  depend on thread scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf  # deeplabq/__init__.py, which always runs first, has set TF_USE_LEGACY_KERAS

from deeplabq.data.base import DatasetError, _cfg, _opt

MEAN_PIXEL = 127.5  # deeplab pads images with this value, so padding is 0 after scaling to [-1, 1]


@dataclass(frozen=True)
class _Preprocessing:
    crop_size: tuple[int, int]
    min_resize_value: int | None
    max_resize_value: int | None
    resize_factor: int | None
    min_scale_factor: float
    max_scale_factor: float
    scale_factor_step_size: float
    flip: bool
    ignore_label: int

    @property
    def resizes(self) -> bool:
        return self.min_resize_value is not None or self.max_resize_value is not None


def _preprocessing(dataset_cfg) -> _Preprocessing:
    crop = _cfg(dataset_cfg, "crop_size")
    if crop is None or len(crop) != 2 or any(int(c) < 1 for c in crop):
        raise DatasetError(f"dataset.crop_size must be [height, width] of positive ints, got {crop}")
    params = _Preprocessing(
        crop_size=(int(crop[0]), int(crop[1])),
        min_resize_value=_opt(dataset_cfg, "min_resize_value"),
        max_resize_value=_opt(dataset_cfg, "max_resize_value"),
        resize_factor=_opt(dataset_cfg, "resize_factor"),
        min_scale_factor=float(_opt(dataset_cfg, "min_scale_factor", 1.0)),
        max_scale_factor=float(_opt(dataset_cfg, "max_scale_factor", 1.0)),
        scale_factor_step_size=float(_opt(dataset_cfg, "scale_factor_step_size", 0.0)),
        flip=bool(_opt(dataset_cfg, "flip", False)),
        ignore_label=int(_cfg(dataset_cfg, "ignore_label")),
    )
    if not 0 < params.min_scale_factor <= params.max_scale_factor:
        raise DatasetError(
            f"dataset.min_scale_factor ({params.min_scale_factor}) must be > 0 and <= "
            f"dataset.max_scale_factor ({params.max_scale_factor})"
        )
    if params.scale_factor_step_size < 0:
        step = params.scale_factor_step_size
        raise DatasetError(f"dataset.scale_factor_step_size must be >= 0, got {step}")
    return params


def _resize_to_range_size(height: int, width: int, params: _Preprocessing) -> tuple[int, int]:
    """Output (h, w) of deeplab's ``resize_to_range`` (float32 arithmetic as there)."""
    if not params.resizes:
        return height, width
    f32 = np.float32
    factor = params.resize_factor
    max_size = params.max_resize_value
    if max_size is not None and factor:
        max_size = max_size - (max_size - 1) % factor
    if params.min_resize_value is not None:
        scale = f32(params.min_resize_value) / f32(min(height, width))
        new = [int(math.floor(f32(height) * scale)), int(math.floor(f32(width) * scale))]
    else:
        new = [height, width]
    if max_size is not None and max(new) > max_size:
        scale = f32(max_size) / f32(max(height, width))
        new = [int(math.floor(f32(height) * scale)), int(math.floor(f32(width) * scale))]
    if factor:
        new = [n + (factor - (n - 1) % factor) % factor for n in new]
    return max(new[0], 1), max(new[1], 1)


def _eval_size(height: int, width: int, params: _Preprocessing, what: str) -> tuple[int, int]:
    size = _resize_to_range_size(height, width, params)
    crop_h, crop_w = params.crop_size
    if size[0] > crop_h or size[1] > crop_w:
        raise DatasetError(
            f"{what} is {size[0]}x{size[1]} after resizing, larger than dataset.crop_size "
            f"{[crop_h, crop_w]}; raise dataset.crop_size or set dataset.min_resize_value/max_resize_value"
        )
    return size


def _resize(image: tf.Tensor, label: tf.Tensor | None, size) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Bilinear image (float32) and nearest label (uint8 HxW) resize with deeplab's align_corners=True."""
    image = tf.compat.v1.image.resize(
        image, size, method=tf.image.ResizeMethod.BILINEAR, align_corners=True
    )
    if label is not None:
        label = tf.compat.v1.image.resize(
            label[..., None], size, method=tf.image.ResizeMethod.NEAREST_NEIGHBOR, align_corners=True
        )[..., 0]
    return image, label


def _pad(image, label, height, width, ignore_label: int):
    """Pad at the bottom/right to at least (height, width): image with the mean pixel, label with ignore."""
    shape = tf.shape(image)
    pad_h, pad_w = tf.maximum(height - shape[0], 0), tf.maximum(width - shape[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=MEAN_PIXEL)
    if label is not None:
        label = tf.pad(label, [[0, pad_h], [0, pad_w]], constant_values=tf.cast(ignore_label, label.dtype))
    return image, label


def _eval_transform(image, label, size, params: _Preprocessing):
    image = tf.cast(image, tf.float32)
    if params.resizes:
        image, label = _resize(image, label, size)
    return _pad(image, label, params.crop_size[0], params.crop_size[1], params.ignore_label)


def _random_scale(seed, params: _Preprocessing) -> tf.Tensor:
    """deeplab's get_random_scale: uniform in [min, max], or uniform over the ``step``-spaced values."""
    lo, hi, step = params.min_scale_factor, params.max_scale_factor, params.scale_factor_step_size
    if step == 0:
        return tf.random.stateless_uniform([], seed, lo, hi)
    num_steps = int((hi - lo) / step + 1)
    if num_steps < 2:
        return tf.constant(lo, tf.float32)
    pick = tf.random.stateless_uniform([], seed, 0, num_steps, dtype=tf.int32)
    return lo + tf.cast(pick, tf.float32) * (hi - lo) / (num_steps - 1)


def _train_transform(image, label, size, params: _Preprocessing, seed):
    """deeplab training preprocessing: resize to range, random scale, pad, random crop, random flip."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    scale_seed, crop_y_seed, crop_x_seed, flip_seed = seeds
    image = tf.cast(image, tf.float32)
    if params.resizes:
        image, label = _resize(image, label, size)
    if params.min_scale_factor != 1.0 or params.max_scale_factor != 1.0:
        scale = _random_scale(scale_seed, params)
        scaled = tf.cast(tf.cast(tf.shape(image)[:2], tf.float32) * scale, tf.int32)
        image, label = _resize(image, label, tf.maximum(scaled, 1))
    crop_h, crop_w = params.crop_size
    image, label = _pad(image, label, crop_h, crop_w, params.ignore_label)
    shape = tf.shape(image)
    offset_y = tf.random.stateless_uniform([], crop_y_seed, 0, shape[0] - crop_h + 1, dtype=tf.int32)
    offset_x = tf.random.stateless_uniform([], crop_x_seed, 0, shape[1] - crop_w + 1, dtype=tf.int32)
    image = image[offset_y : offset_y + crop_h, offset_x : offset_x + crop_w]
    label = label[offset_y : offset_y + crop_h, offset_x : offset_x + crop_w]
    if params.flip:
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
        label = tf.cond(flip, lambda: tf.reverse(label, [1]), lambda: label)
    return image, label


# ------------------------------------------------------------------------------------- numpy eval path


def preprocess_for_eval(
    image: np.ndarray, label: np.ndarray | None, dataset_cfg
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """The eval pipeline's transform for one image: (padded image float32, padded label, valid (h, w))."""
    params = _preprocessing(dataset_cfg)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if label is not None and np.shape(label) != image.shape[:2]:
        raise DatasetError(f"label shape {np.shape(label)} does not match image shape {image.shape[:2]}")
    size = _eval_size(image.shape[0], image.shape[1], params, f"image of shape {image.shape[:2]}")
    label_in = None if label is None else tf.convert_to_tensor(np.asarray(label, np.uint8))
    padded_image, padded_label = _eval_transform(tf.convert_to_tensor(image), label_in, size, params)
    return padded_image.numpy(), None if label is None else padded_label.numpy(), size


def postprocess_labels(label_map: np.ndarray, valid_hw, original_hw) -> np.ndarray:
    """Crop a predicted HxW label map to its valid region and resize (nearest) to the original image size."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"expected an HxW label map, got shape {label_map.shape}")
    valid_h, valid_w = int(valid_hw[0]), int(valid_hw[1])
    out_h, out_w = int(original_hw[0]), int(original_hw[1])
    valid = label_map[:valid_h, :valid_w]
    return valid[np.ix_(_nearest_indices(valid_h, out_h), _nearest_indices(valid_w, out_w))]


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # TF1 resize_nearest_neighbor with align_corners=True, as deeplab resizes predictions back
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    return np.minimum(np.floor(np.arange(out_size) * scale + 0.5).astype(np.int64), in_size - 1)
