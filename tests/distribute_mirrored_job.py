"""Run by tests/test_distribute.py in a fresh process: two logical CPU devices must be set up before TensorFlow
starts. ``python tests/distribute_mirrored_job.py <dir> <overrides...>`` trains with ``train.strategy=mirrored``
(store and outputs under <dir>), then prints one JSON line: the replica count, and the first step's loss of a
batch-statistics model on one device and on two replicas with and without ``train.sync_batch_norm``."""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deeplabq  # noqa: E402, F401, I001  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from deeplabq import distribute  # noqa: E402
from deeplabq.model import build_deeplab  # noqa: E402
from deeplabq.tasks.train import train  # noqa: E402
from deeplabq.training import _loss_terms  # noqa: E402
from tests.conftest import TINY_SPEC, compose_config, tiny_images  # noqa: E402

SPEC = dataclasses.replace(TINY_SPEC, dropout_rate=0.0)  # dropout masks are drawn per replica


def first_loss(strategy, sync: bool) -> float:
    """The loss of one batch of 4 in training mode (batch statistics), from the same initial weights."""
    images = np.stack(tiny_images(4))
    labels = np.random.default_rng(0).integers(0, 5, (4, 33, 33)).astype(np.int32)
    keras.utils.set_random_seed(0)
    if strategy is None:
        logits = build_deeplab(SPEC)(images, training=True)
        total, pixels = _loss_terms(logits, labels, 255)
        return float(total / pixels)
    with strategy.scope():
        model = build_deeplab(SPEC)
    if sync:
        distribute.synchronize_batch_norm(model.layers)

    def replica(x, y):
        context = tf.distribute.get_replica_context()
        total, pixels = _loss_terms(model(x, training=True), y, 255)
        return context.all_reduce("sum", total) / context.all_reduce("sum", pixels)

    batches = distribute.distribute_batches(strategy, tf.data.Dataset.from_tensors((images, labels)))
    x, y = next(iter(batches))
    return float(strategy.experimental_local_results(tf.function(lambda a, b: strategy.run(replica, (a, b)))(x, y))[0])


def main() -> None:
    base, overrides = Path(sys.argv[1]), sys.argv[2:]
    train(compose_config(base, [*overrides, "train.strategy=mirrored"]), base / "run")
    strategy = distribute.make_strategy("mirrored")
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "single": first_loss(None, False),
                      "synchronized": first_loss(strategy, True), "per_replica": first_loss(strategy, False)}))


if __name__ == "__main__":
    main()
