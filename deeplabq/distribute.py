"""Training on several devices (``train.strategy``) and in mixed precision (``train.mixed_precision``).

TensorFlow's own engines, nothing of ours: ``tf.distribute.MirroredStrategy`` (every local GPU, or every
logical CPU device, in one process) and ``tf.distribute.MultiWorkerMirroredStrategy`` (one process per host,
the cluster named by ``TF_CONFIG``), and Keras's mixed-precision policies. ``train.strategy=default`` with
``train.mixed_precision=null`` takes none of this: the plain single-device loop, unchanged.

* ``train.batch_size`` is the global batch: every step takes the same batch as a single-device run and splits
  it evenly over the replicas (``experimental_distribute_dataset``); the loss is the global batch's (each
  replica divides its pixel-loss sum by the valid pixels of the whole batch) and the gradients are summed over
  replicas before the NaN guard sees them, so one step is the single-device step. The schedule is unchanged.
* ``train.sync_batch_norm`` (default true): batch-norm layers compute their batch statistics over the global
  batch (tf_keras's ``synchronized`` batch norm); false keeps per-replica statistics, as research/deeplab's
  ``num_clones`` did. No effect with one replica.
* Only the chief (TF_CONFIG task ``chief``, else worker 0) logs to MLflow and writes the run's checkpoints and
  TFLite files; other workers save into a temporary folder that they delete (TF's multi-worker guide: every
  worker must take part in a save, as reading a synchronised variable is a collective).
* After training, the trained model is copied into a plain float32 model built outside any strategy
  (:func:`snapshot`, :func:`rebuild`): export, fake quantization and TFLite conversion see what they see after
  single-device training (TFLite conversion of distributed variables fails: tensorflow/tensorflow#42432).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import tensorflow as tf
import tf_keras as keras

from deeplabq.config import TrainSpec
from deeplabq.errors import ConfigError


def _tf_config() -> dict:
    text = os.environ.get("TF_CONFIG") or "{}"
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"train.strategy=multi_worker: TF_CONFIG is not JSON ({error})") from None


def chief_process(strategy: str) -> bool:
    """Whether this process is the one that logs, checkpoints and exports (decided from TF_CONFIG alone, before
    TensorFlow starts): always, unless ``strategy`` is multi_worker and TF_CONFIG names another task."""
    if strategy != "multi_worker":
        return True
    config = _tf_config()
    task, cluster = config.get("task") or {}, config.get("cluster") or {}
    if not task:
        return True  # no TF_CONFIG: make_strategy refuses it, in the run
    kind, index = task.get("type"), int(task.get("index", 0))
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)


def is_chief() -> bool:
    """:func:`chief_process` for the strategy in scope (True outside a multi-worker strategy)."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return chief_process("multi_worker")
    return True


_MADE: dict[str, tf.distribute.Strategy] = {}


def make_strategy(name: str) -> tf.distribute.Strategy | None:
    """The strategy of ``train.strategy`` (None for ``default``), one per process: the jobs of a sweep run in one
    process share it (a second strategy over the same devices would reuse its collective keys, and
    ``multi_worker`` can only be created before any TensorFlow op runs, as its collectives are configured at
    start-up)."""
    if name == "default":
        return None
    if name not in _MADE:
        _MADE[name] = _new_strategy(name)
    return _MADE[name]


def _new_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        cluster = _tf_config().get("cluster")
        if not cluster:
            raise ConfigError("train.strategy=multi_worker needs TF_CONFIG (the cluster and this process's task), "
                              "e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host1:12345\", \"host2:12345\"]}, "
                              "\"task\": {\"type\": \"worker\", \"index\": 0}}'")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as error:  # "Collective ops must be configured at program startup"
            raise ConfigError(f"train.strategy=multi_worker needs a fresh process per job (TensorFlow had started "
                              f"before the strategy: {error})") from None
    raise ConfigError(f"train.strategy must be one of default, mirrored, multi_worker, got {name!r}")


def is_plain(train: TrainSpec) -> bool:
    """True when training is the plain single-device float32 loop (no strategy, no mixed precision)."""
    return train.strategy == "default" and train.mixed_precision is None


@contextlib.contextmanager
def training_scope(train: TrainSpec):
    """Build and train inside this: the strategy's scope and the mixed-precision policy (both undone on exit).
    Yields the strategy, or None for ``default``."""
    strategy = make_strategy(train.strategy)
    previous = keras.mixed_precision.global_policy()
    if train.mixed_precision:
        keras.mixed_precision.set_global_policy(train.mixed_precision)
    try:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            yield strategy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def check_batch_size(train: TrainSpec, strategy) -> None:
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if int(train.batch_size) % replicas:
        raise ConfigError(f"train.batch_size={train.batch_size} is the global batch: it must be a multiple of the "
                          f"{replicas} replicas of train.strategy={train.strategy}")


def distribute_batches(strategy, dataset: tf.data.Dataset):
    """``dataset`` (global batches) split over the replicas: replica r of step n gets the r-th slice of the n-th
    global batch, on every worker (DATA sharding: each worker reads the stream and keeps its slices)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def synchronize_batch_norm(layers) -> int:
    """Batch statistics over the global batch in every BatchNormalization layer of ``layers`` (tf_keras's
    ``synchronized=True``, which runs unfused); returns how many."""
    count = 0
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized, layer.fused = True, False
            count += 1
    return count


def snapshot(model: keras.Model | None) -> dict | None:
    """The weights of a model trained in :func:`training_scope`, read there (on every worker: reading a
    synchronised variable is a collective)."""
    if model is None:
        return None
    quantized = any(getattr(layer, "layer", None) is not None for layer in model.layers)
    weights = model.weights
    if tf.distribute.has_strategy():
        # One graph for all reads: read eagerly, each synchronised variable (batch norm's moving statistics) is an
        # all-reduce of its own across the workers, ~0.1 s each (tensorflow#32653); in one function they run
        # together.
        values = [value.numpy() for value in tf.function(lambda: [tf.identity(w) for w in weights])()]
    else:
        values = [w.numpy() for w in weights]
    return {"quantized": quantized, "weights": values}


def rebuild(saved: dict | None, model_spec) -> keras.Model | None:
    """A plain float32 model (QAT if the snapshot's was) built outside any strategy, with the snapshot's weights
    (in the order of ``model.weights``, which freezing batch norm keeps; auto-named layers such as tfmot's
    ``quantize_layer_<n>`` get other names in a second model of the same process)."""
    if saved is None:
        return None
    from deeplabq.model import build_deeplab
    from deeplabq.quantization import quantize_model

    model = build_deeplab(model_spec)
    if saved["quantized"]:
        model = quantize_model(model)
    shapes = [tuple(w.shape) for w in model.weights]
    if shapes != [value.shape for value in saved["weights"]]:
        raise ValueError("the trained model's weights do not fit a model rebuilt from its spec")
    model.set_weights(saved["weights"])
    return model


@contextlib.contextmanager
def save_folder(checkpoint_dir: Path):
    """Where this process writes checkpoints: ``checkpoint_dir`` on the chief, a temporary folder elsewhere
    (deleted on exit)."""
    if is_chief():
        yield checkpoint_dir
        return
    folder = Path(tempfile.mkdtemp(prefix="deeplabq_worker_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
