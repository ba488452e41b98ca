"""The training loop and what it needs: loss, learning-rate schedule, optimizer, batch-norm handling,
the initial weights, checkpoints. The train job (deeplabq.tasks.train) and the quant modes call it."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import mlflow
import numpy as np
import tensorflow as tf
import tf_keras as keras
from mlflow.tracking import MlflowClient

from deeplabq import checkpoints as ckpt_lib
from deeplabq import data as data_lib
from deeplabq import distribute, tracking
from deeplabq.config import InitSpec, RunSpec, TrainSpec
from deeplabq.console import progress
from deeplabq.errors import ConfigError, InputNotFoundError, SourceError, UserError
from deeplabq.quantization import freeze_batch_norm, set_range_updates
from deeplabq.sources import CHECKPOINT_DIR, PHASE_FILE, load_weights, resolve_source


def segmentation_loss(logits, labels, ignore_label: int):
    """Mean softmax cross-entropy over the pixels that are not ``ignore_label``."""
    pixel_loss, pixels = _loss_terms(logits, labels, ignore_label)
    return pixel_loss / tf.maximum(pixels, 1.0)


def _loss_terms(logits, labels, ignore_label: int):
    """(sum of the softmax cross-entropy over the valid pixels, number of valid pixels), in float32 (the logits
    of a mixed-precision model too)."""
    valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    per_pixel = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels,
                                                               logits=tf.cast(logits, tf.float32))
    per_pixel = tf.where(valid, per_pixel, tf.zeros_like(per_pixel))
    return tf.reduce_sum(per_pixel), tf.reduce_sum(tf.cast(valid, tf.float32))


def learning_rate_schedule(train: TrainSpec):
    """research/deeplab's 'poly' policy: lr * (1 - step / steps) ** power, or a constant."""
    base = float(train.learning_rate)
    if train.learning_policy == "constant":
        return keras.optimizers.schedules.PolynomialDecay(base, int(train.steps), base, power=1.0)
    return keras.optimizers.schedules.PolynomialDecay(
        base, int(train.steps), float(train.end_learning_rate), power=float(train.learning_power)
    )


def make_optimizer(train: TrainSpec, start_step: int = 0):
    schedule = learning_rate_schedule(train)
    if train.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule, epsilon=float(train.adam_epsilon))
    else:
        optimizer = keras.optimizers.SGD(schedule, momentum=float(train.momentum))
    optimizer.iterations.assign(start_step)  # the schedule continues where a previous phase stopped
    return optimizer


def configure_batch_norm(model: keras.Model, trainable: bool, decay: float) -> None:
    """fine_tune_batch_norm=false: BN layers run in inference mode with frozen statistics and affine.

    ``decay`` is the moving-average momentum of the statistics: research/deeplab's 0.9997 suits 30k+ steps;
    a short run needs less, or evaluation uses statistics that never left their initial values.
    """
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = trainable
            layer.momentum = decay


def reestimate_batch_norm_statistics(model: keras.Model, batches, num_batches: int) -> int:
    """Give every BatchNormalization layer the statistics of its input on ``batches``, keeping the function.

    A checkpoint with batch norm folded into the kernels (TFLite-derived model-zoo files: moving_mean 0,
    moving_variance 1, beta = folded bias) normalizes with 0/1, so training with batch statistics
    (``fine_tune_batch_norm=true``) would replace them with the real ones and start from another function.
    Here each BN layer, with measured input mean ``m`` and variance ``v`` (per channel, pooled over
    ``num_batches`` batches of images, in inference mode), gets::

        moving_mean = m, moving_variance = v
        gamma = gamma0 * sqrt(v + eps) / sqrt(v0 + eps)
        beta  = beta0 + gamma0 * (m - m0) / sqrt(v0 + eps)

    so ``gamma * (x - m) / sqrt(v + eps) + beta == gamma0 * (x - m0) / sqrt(v0 + eps) + beta0`` for every
    ``x``: inference output is unchanged (up to float rounding) and a batch-statistics training step starts
    from (nearly) the same function. As every layer keeps its function, the input of every BN layer is the
    same before and after, so all statistics come from one set of inference passes. Returns the number of
    BN layers updated. Float models only.
    """
    layers = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    if any(getattr(layer, "layer", None) is not None for layer in model.layers):
        raise ValueError("reestimate_batch_norm_statistics works on a float model, not a quantized one")
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    sums = [np.zeros(layer.moving_mean.shape, np.float64) for layer in layers]
    squares = [np.zeros(layer.moving_mean.shape, np.float64) for layer in layers]
    counts = [0] * len(layers)
    for batch in itertools.islice(batches, num_batches):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch  # (images, labels) pipelines too
        outputs = probe(images, training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for i, x in enumerate(outputs):
            x = tf.reshape(tf.cast(x, tf.float64), [-1, x.shape[-1]])
            sums[i] += tf.reduce_sum(x, axis=0).numpy()
            squares[i] += tf.reduce_sum(tf.square(x), axis=0).numpy()
            counts[i] += int(x.shape[0])
    if not counts[0]:
        raise ValueError("reestimate_batch_norm_statistics got no batches")
    for i, layer in enumerate(layers):
        if not (layer.scale and layer.center):
            raise ValueError(f"{layer.name}: needs both gamma and beta (scale=True, center=True)")
        mean = sums[i] / counts[i]
        var = np.maximum(squares[i] / counts[i] - mean ** 2, 0.0)
        eps = float(layer.epsilon)
        mean0 = layer.moving_mean.numpy().astype(np.float64)
        var0 = layer.moving_variance.numpy().astype(np.float64)
        gamma0 = layer.gamma.numpy().astype(np.float64)
        beta0 = layer.beta.numpy().astype(np.float64)
        scale0 = gamma0 / np.sqrt(var0 + eps)
        layer.gamma.assign((scale0 * np.sqrt(var + eps)).astype(np.float32))
        layer.beta.assign((beta0 + scale0 * (mean - mean0)).astype(np.float32))
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(var.astype(np.float32))
    return len(layers)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        inner = getattr(layer, "layer", None)  # tfmot QuantizeWrapper
        if inner is not None:
            yield inner


NON_FINITE_LOSS, NON_FINITE_GRADIENT = "training loss", "gradient norm"


class TrainingDivergedError(UserError, ValueError):
    """The loss, a gradient or a weight became inf/NaN: a user error (learning rate too high), reported in one
    line that names the last checkpoint with finite weights."""


def _diverged(what: str, step: int, train: TrainSpec, manager) -> TrainingDivergedError:
    last = manager.latest_checkpoint or "none (no checkpoint was written)"
    return TrainingDivergedError(f"training diverged at step {step}: {what} is not finite; lower "
                                 f"train.learning_rate (now {train.learning_rate}). Last checkpoint with finite "
                                 f"weights: {last}")


def _finite_weights(model: keras.Model) -> bool:
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.variables if v.dtype.is_floating)


class Trainer:
    """Custom training loop over one model; a new Trainer takes over when delayed QAT switches models.

    Created inside a ``tf.distribute`` strategy's scope, its step runs on every replica (``strategy.run``) and
    computes the global batch's loss and gradient (deeplabq.distribute); otherwise it is the plain step.
    With ``train.mixed_precision=mixed_float16`` the optimizer scales the loss (dynamic loss scaling)."""

    def __init__(self, model: keras.Model, train: TrainSpec, ignore_label: int, start_step: int) -> None:
        self.model = model
        self.strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
        self.replicas = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        self.schedule = learning_rate_schedule(train)
        self.optimizer = make_optimizer(train, start_step)
        # float16 gradients underflow without it; bfloat16 has float32's exponent range and needs none.
        self.loss_scaling = train.mixed_precision == "mixed_float16"
        if self.loss_scaling:
            self.optimizer = keras.mixed_precision.LossScaleOptimizer(self.optimizer)
        if self.replicas > 1 and train.sync_batch_norm:
            distribute.synchronize_batch_norm(_all_layers(model))
        self.ignore_label = int(ignore_label)
        self.weight_decay = float(train.weight_decay)
        # Create the optimizer's slot variables now: a tf.function that creates variables on its first call
        # is traced twice, which costs 5-15 s per model (twice that for a QAT model).
        self.optimizer.build(model.trainable_variables)
        self.retrace()

    def retrace(self) -> None:
        """A new tf.function for the train step: needed after a layer's ``trainable`` changed (a traced step
        keeps the batch-norm mode and the trainable variables it was traced with)."""
        self.train_step = tf.function(self._train_step if self.strategy is None else self._distributed_step)

    def _regularization(self):
        kernels = [v for v in self.model.trainable_variables if "kernel" in v.name]
        return self.weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in kernels])

    def _train_step(self, images, labels):
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            loss = segmentation_loss(logits, labels, self.ignore_label)
            total = loss + self._regularization()
            scaled = self.optimizer.get_scaled_loss(total) if self.loss_scaling else total
        variables = self.model.trainable_variables
        gradients = tape.gradient(scaled, variables)
        if self.loss_scaling:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        self._guarded_update(total, gradients, variables)
        return loss, total

    def _guarded_update(self, total, gradients, variables, **apply_options) -> None:
        """The NaN guard, inside the compiled step: a non-finite loss or gradient stops training before the
        update, so the weights (and every checkpoint written from them) stay finite. With loss scaling, an
        overflowing gradient is the loss scale's business instead (the step is skipped, the scale lowered)."""
        checks = [tf.debugging.check_numerics(total, NON_FINITE_LOSS)]
        if not self.loss_scaling:
            checks.append(tf.debugging.check_numerics(tf.linalg.global_norm(gradients), NON_FINITE_GRADIENT))
        with tf.control_dependencies(checks):
            self.optimizer.apply_gradients(zip(gradients, variables, strict=True), **apply_options)

    def _distributed_step(self, images, labels):
        loss, total = self.strategy.run(self._replica_step, args=(images, labels))
        first = self.strategy.experimental_local_results
        return first(loss)[0], first(total)[0]  # all-reduced: the same on every replica

    def _replica_step(self, images, labels):
        """One replica's share of the global batch. Its pixel-loss sum is divided by the valid pixels of the whole
        batch and the weight decay by the replica count, so the sums over replicas of loss and gradients are the
        single-device step's; the guard sees those sums, as every replica (and worker) does."""
        context, add = tf.distribute.get_replica_context(), tf.distribute.ReduceOp.SUM
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            pixel_loss, pixels = _loss_terms(logits, labels, self.ignore_label)
            loss = pixel_loss / tf.maximum(context.all_reduce(add, pixels), 1.0)
            total = loss + self._regularization() / self.replicas
            scaled = self.optimizer.get_scaled_loss(total) if self.loss_scaling else total
        variables = self.model.trainable_variables
        gradients = context.all_reduce(add, tape.gradient(scaled, variables))
        if self.loss_scaling:
            gradients = self.optimizer.get_unscaled_gradients(gradients)
        loss, total = context.all_reduce(add, [loss, total])
        self._guarded_update(total, gradients, variables, skip_gradients_aggregation=True)
        return loss, total

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def checkpoint(self, with_rng: bool = True) -> tf.train.Checkpoint:
        """Model, optimizer and (``with_rng``) the dropout masks' random generators: all a resume needs."""
        if not with_rng:  # checkpoints written before the generators were saved
            return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer, rng=_dropout_generators(self.model))


def _dropout_generators(model: keras.Model) -> list:
    """The tf.random.Generator of every Dropout layer (keras keeps them out of the model's checkpoint)."""
    return [layer._random_generator._generator for layer in _all_layers(model)
            if isinstance(layer, keras.layers.Dropout) and getattr(layer._random_generator, "_generator", None)]


def _run_folders_with_checkpoints(parent: Path, limit: int = 5) -> list[Path]:
    """The newest ``limit`` folders beside a run folder that hold a checkpoint (what ``resume`` may have meant)."""
    found = [index.parent.parent for index in parent.glob(f"*/{CHECKPOINT_DIR}/checkpoint")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


def _has_rng(checkpoint_prefix: str) -> bool:
    return any(name.startswith("rng/") for name, _ in tf.train.list_variables(checkpoint_prefix))


def _logged_until(metric: str) -> int:
    """The last step of ``metric`` the active MLflow run has (-1: none): a resumed run does not log it twice."""
    run = mlflow.active_run()
    history = MlflowClient().get_metric_history(run.info.run_id, metric) if run else []
    return max((m.step for m in history), default=-1)


def initialize_weights(model: keras.Model, init: InitSpec, train_batches=None) -> str:
    """Apply ``init`` (scratch / keras_imagenet / deeplab_checkpoint / run); returns what was loaded.

    ``init.reestimate_batch_norm`` > 0 then re-estimates the batch-norm statistics on that many batches of
    ``train_batches()`` (an iterator of train batches), keeping the function
    (:func:`reestimate_batch_norm_statistics`).
    """
    source = init.source
    if source == "scratch":
        return "scratch"
    described = _load_initial_weights(model, init)
    reestimate = int(init.reestimate_batch_norm or 0)
    if reestimate:
        if train_batches is None:
            raise ValueError("init.reestimate_batch_norm needs train batches")
        count = reestimate_batch_norm_statistics(model, train_batches(), reestimate)
        described += f" (statistics of {count} BN layers re-estimated on {reestimate} train batches)"
    return described


def init_batches(spec: RunSpec, train_split):
    """Train batches for ``init.reestimate_batch_norm``: the augmented train pipeline, batch train.batch_size."""
    return lambda: data_lib.iterate(data_lib.input_pipeline(
        train_split, spec.dataset, training=True, batch_size=int(spec.train.batch_size), seed=int(spec.train.seed) + 1))


def _load_initial_weights(model: keras.Model, init: InitSpec) -> str:
    source = init.source
    if source == "keras_imagenet":
        ckpt_lib.load_keras_imagenet_weights(model, init.path or "imagenet")
    elif source == "deeplab_checkpoint":
        ckpt_lib.load_deeplab_tf1_checkpoint(
            model, str(init.path), initialize_last_layer=bool(init.initialize_last_layer)
        )
    elif source == "run":
        source = resolve_source(str(init.path))
        if source.kind != "checkpoint" or source.quantized:
            raise SourceError(f"init.path={init.path} must be a float checkpoint, got {source.describe()}")
        load_weights(model, source, "init.path")
    return f"{init.source}:{init.path}"


def _log_checkpoint(save_path: str) -> None:
    directory = Path(save_path).parent
    for file in directory.glob(Path(save_path).name + ".*"):
        tracking.log_artifact(file, CHECKPOINT_DIR)
    tracking.log_artifact(directory / "checkpoint", CHECKPOINT_DIR)
    if (directory / PHASE_FILE).exists():
        tracking.log_artifact(directory / PHASE_FILE, CHECKPOINT_DIR)


def fit(model: keras.Model, spec: RunSpec, output_dir: Path, train_split, *, quantize_at: int | None = None,
        quantize_fn=None, freeze_bn_at: int | None = None) -> keras.Model:
    """Train ``model`` for ``train.steps`` steps; returns the trained model.

    With ``quantize_at`` (delayed QAT) the float model trains until that step, then ``quantize_fn(model,
    batches)`` returns the fake-quantized model that trains for the remaining steps (same schedule).
    With ``freeze_bn_at`` (contrib.quantize's / MLPerf's ``freeze_bn_delay``, at or after ``quantize_at``)
    the batch-norm moving statistics of the model being trained stop updating from that step on.
    Checkpoints go to ``<output_dir>/checkpoints`` every ``train.checkpoint_every_steps`` and to MLflow.
    Inside a ``tf.distribute`` strategy's scope every replica trains its slice of each global batch; only the
    chief logs and keeps checkpoints (deeplabq.distribute).
    """
    with distribute.save_folder(output_dir / CHECKPOINT_DIR) as save_dir:
        return _fit(model, spec, output_dir, train_split, save_dir, quantize_at, quantize_fn, freeze_bn_at)


def _fit(model, spec: RunSpec, output_dir: Path, train_split, save_dir: Path, quantize_at, quantize_fn,
         freeze_bn_at) -> keras.Model:
    train = spec.train
    chief = distribute.is_chief()
    strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    distribute.check_batch_size(train, strategy)
    total_steps = int(train.steps)
    checkpoint_dir = output_dir / CHECKPOINT_DIR
    configure_batch_norm(model, bool(train.fine_tune_batch_norm), float(train.batch_norm_decay))

    if freeze_bn_at is not None and quantize_at is not None and freeze_bn_at < quantize_at:
        raise ValueError(f"freeze_bn_at={freeze_bn_at} is before quantize_at={quantize_at}")
    start_step, quantized, bn_frozen = 0, False, False
    latest = tf.train.latest_checkpoint(str(checkpoint_dir)) if train.resume else None
    if train.resume and latest is None:
        nearby = _run_folders_with_checkpoints(output_dir.parent)
        hint = ("; run folders with checkpoints next to it: " + ", ".join(str(p) for p in nearby)) if nearby else ""
        raise InputNotFoundError(f"resume=true, but {checkpoint_dir} has no checkpoint to resume from: set "
                                f"hydra.run.dir to the folder of the run to continue{hint}")
    if latest:
        phase_file = checkpoint_dir / PHASE_FILE
        quantized = bool(json.loads(phase_file.read_text()).get("quantized")) if phase_file.exists() else False
        if quantized:
            if quantize_fn is None:
                raise ConfigError(f"{latest} is a quantized checkpoint: resume it with its QAT quant mode (quant=...)")
            model = quantize_fn(model, None)
        trainer = Trainer(model, train, spec.dataset.ignore_label, 0)
        trainer.checkpoint(with_rng=_has_rng(latest)).restore(latest).assert_existing_objects_matched()
        start_step = trainer.step
        if quantized:
            set_range_updates(model, start_step - int(quantize_at))  # the range EMAs' warm-up continues
        print(f"resumed from {latest} at step {start_step}")
    else:
        trainer = Trainer(model, train, spec.dataset.ignore_label, 0)
    manager = tf.train.CheckpointManager(trainer.checkpoint(), str(save_dir), max_to_keep=2)
    # The batch of step n is the n-th of one seeded stream: a resumed run skips the ones it has trained on.
    # Calibration at the switch to QAT draws from a stream of its own, so it never shifts this one.
    stream = data_lib.input_pipeline(train_split, spec.dataset, training=True, batch_size=int(train.batch_size),
                                     seed=int(train.seed), start_batch=start_step)
    batches = data_lib.iterate(stream if strategy is None else distribute.distribute_batches(strategy, stream))
    calibration_batches = data_lib.iterate(data_lib.input_pipeline(
        train_split, spec.dataset, training=True, batch_size=int(train.batch_size), seed=int(train.seed) + 2))
    logged_until = _logged_until("loss") if latest else -1

    window_start, window_images, window_losses = time.perf_counter(), 0, []
    bar = progress(total=total_steps, initial=start_step, desc="train", unit="step")
    for step in range(start_step, total_steps):
        if quantize_at is not None and not quantized and step >= quantize_at:
            model = quantize_fn(trainer.model, calibration_batches)
            trainer = Trainer(model, train, spec.dataset.ignore_label, step)
            manager = tf.train.CheckpointManager(trainer.checkpoint(), str(save_dir), max_to_keep=2)
            quantized = True
            if chief:
                mlflow.log_metric("quantization_started", 1.0, step=step)
        if freeze_bn_at is not None and not bn_frozen and step >= freeze_bn_at:
            freeze_batch_norm(trainer.model)  # also on resume: a restored model is built unfrozen
            trainer.retrace()
            bn_frozen = True
            if step == freeze_bn_at and chief:
                mlflow.log_metric("batch_norm_frozen", 1.0, step=step)
        images, labels = next(batches)
        try:
            loss, total = trainer.train_step(images, labels)
        except tf.errors.InvalidArgumentError as error:
            what = next((w for w in (NON_FINITE_LOSS, NON_FINITE_GRADIENT) if w in str(error)), None)
            if what is None:
                raise
            raise _diverged(f"the {what}", step + 1, train, manager) from None
        window_images += int(train.batch_size)
        window_losses.append(loss)
        done = step + 1
        if (done % int(train.log_every_steps) == 0 or done == total_steps) and done > logged_until:
            elapsed = time.perf_counter() - window_start
            loss_value = float(np.mean([float(v) for v in window_losses]))  # mean over the log window
            metrics = {"loss": loss_value, "total_loss": float(total), "learning_rate": float(trainer.schedule(done)),
                       "images_per_sec": window_images / max(elapsed, 1e-9)}
            if chief:
                tracking.log_metrics(metrics, step=done)
            if bar.disable:  # no terminal: a log line per window instead of the bar
                print(f"step {done}/{total_steps} loss {loss_value:.4f} "
                      f"({window_images / max(elapsed, 1e-9):.1f} img/s)")
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            window_start, window_images, window_losses = time.perf_counter(), 0, []
        if done % int(train.checkpoint_every_steps) == 0 or done == total_steps:
            if not _finite_weights(trainer.model):
                raise _diverged("a weight", done, train, manager)
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / PHASE_FILE).write_text(json.dumps({"quantized": quantized}))
            saved = manager.save(checkpoint_number=done)  # every worker saves: reading synced variables is collective
            if chief:
                _log_checkpoint(saved)
        bar.update(1)
    bar.close()
    return trainer.model

