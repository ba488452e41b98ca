"""The tf.data input pipeline: ``input_pipeline`` for training and evaluation, ``cached_pipeline``, ``iterate``.

Examples are decoded in parallel by their split's ``load`` inside ``tf.numpy_function`` and transformed with
the TF ops of ``deeplabq.data.preprocessing``; a reader error raised inside tf.data comes back out of
``iterate`` as the ``DatasetError`` it was.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf  # deeplabq/__init__.py, which always runs first, has set TF_USE_LEGACY_KERAS

from deeplabq.data.base import DatasetError, SegmentationSplit
from deeplabq.data.preprocessing import (
    _eval_size,
    _eval_transform,
    _Preprocessing,
    _preprocessing,
    _resize_to_range_size,
    _train_transform,
)


def _load_for_pipeline(data: SegmentationSplit, params: _Preprocessing, training: bool, index):
    index = int(index)
    image, label = data.load(index)
    h, w = label.shape
    if training:
        size = _resize_to_range_size(h, w, params)
    else:
        size = _eval_size(h, w, params, f"image {data.describe(index)}")
    return image, label, np.array(size, np.int32)


# ------------------------------------------------------------------------------------------------ tf.data


def input_pipeline(
    data: SegmentationSplit,
    dataset_cfg,
    *,
    training: bool,
    batch_size: int,
    seed: int = 0,
    repeat: bool | None = None,
    start_batch: int = 0,
) -> tf.data.Dataset:
    """Batches of (images float32 [B, crop_h, crop_w, 3] in 0..255, labels int32 [B, crop_h, crop_w]).

    Training shuffles, augments and (by default) repeats forever, with full batches only; the stream is a
    function of ``seed`` alone, and ``start_batch`` starts it at that batch (a resumed run). Evaluation is
    deterministic: resize to range, pad bottom/right to the crop, one pass, last batch may be short.
    A file that fails to decode raises ``tf.errors.InvalidArgumentError`` whose message holds the
    ``DatasetError: ...`` text naming the file.
    """
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    params = _preprocessing(dataset_cfg)
    repeat = training if repeat is None else repeat
    crop_h, crop_w = params.crop_size
    load = functools.partial(_load_for_pipeline, data, params, training)

    def example(draw, index):
        image, label, size = tf.numpy_function(
            load, [index], [tf.uint8, tf.uint8, tf.int32], stateful=False, name="decode"
        )
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        if training:
            draw_seed = tf.stack([tf.constant(seed, tf.int64), draw])
            image, label = _train_transform(image, label, size, params, draw_seed)
        else:
            image, label = _eval_transform(image, label, size, params)
        image = tf.ensure_shape(image, [crop_h, crop_w, 3])
        return image, tf.ensure_shape(tf.cast(label, tf.int32), [crop_h, crop_w])

    ds = tf.data.Dataset.range(len(data))
    if training:
        ds = ds.shuffle(len(data), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.enumerate()  # the n-th draw seeds its own augmentation
    if start_batch:  # resume: the stream from batch ``start_batch`` on, skipped before any image is decoded
        if not training:
            raise ValueError("start_batch applies to training streams (full batches) only")
        ds = ds.skip(int(start_batch) * batch_size)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    return ds.prefetch(tf.data.AUTOTUNE)


def cached_pipeline(
    data: SegmentationSplit,
    dataset_cfg,
    *,
    training: bool,
    batch_size: int,
    num_batches: int,
    seed: int = 0,
) -> tf.data.Dataset:
    """The first ``num_batches`` batches of ``input_pipeline``, decoded once, then repeated from memory.

    For benchmarks: timing this against ``input_pipeline`` separates model time from input time.
    """
    ds = input_pipeline(data, dataset_cfg, training=training, batch_size=batch_size, seed=seed, repeat=True)
    ds = ds.take(num_batches).cache()
    for _ in ds:  # fill the cache now, so the first timed pass does not decode
        pass
    return ds.repeat().prefetch(tf.data.AUTOTUNE)


def iterate(dataset: tf.data.Dataset):
    """Iterate a pipeline, re-raising a reader error from inside tf.data as the DatasetError it was."""
    iterator = iter(dataset)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            text = error.message
            if "DatasetError: " not in text:
                raise
            message = text.split("DatasetError: ", 1)[1].split("\n", 1)[0]
            raise DatasetError(message) from None
