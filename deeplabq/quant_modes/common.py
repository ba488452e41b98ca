"""What several quant modes share: the float checkpoint they start from, the switch to a fake-quantized
model, the initial weights and the batch-norm freeze checks."""

from __future__ import annotations

import itertools

import mlflow
import tensorflow as tf

from deeplabq import distribute, quantization
from deeplabq.config import RunSpec, require
from deeplabq.errors import InputNotFoundError, SourceError
from deeplabq.quant_modes.base import TrainContext
from deeplabq.sources import CHECKPOINT_DIR, load_weights, resolve_source
from deeplabq.training import init_batches, initialize_weights

CALIBRATION_BATCHES = 4  # train batches that set activation ranges before fake quantization starts


def require_float_checkpoint(spec: RunSpec) -> None:
    require(spec.quant.float_checkpoint is not None,
            f"quant={spec.quant.mode} needs a converged float model: set quant.float_checkpoint=<run dir, "
            f"checkpoint prefix or MLflow run id> (train one with `python train.py quant=float`)")


def load_float_checkpoint(model, spec: RunSpec) -> str:
    """Load ``quant.float_checkpoint`` (a float run dir, checkpoint prefix or MLflow run id) into ``model``."""
    float_checkpoint = spec.quant.float_checkpoint
    try:
        source = resolve_source(str(float_checkpoint))
    except InputNotFoundError as error:  # name the key that pointed at it
        raise InputNotFoundError(f"quant.float_checkpoint={float_checkpoint}: {error}") from None
    if source.kind != "checkpoint" or source.quantized:
        raise SourceError(f"quant.float_checkpoint={float_checkpoint} is not a float checkpoint "
                          f"({source.describe()})")
    load_weights(model, source, "quant.float_checkpoint", spec.model)
    if distribute.is_chief():  # other workers of a multi-worker run log nothing
        mlflow.set_tag("deeplabq.float_checkpoint", source.describe())
    return source.describe()


def initialize(model, context: TrainContext) -> None:
    """Apply ``init`` to a model trained from the start, unless the run resumes from its own checkpoint."""
    spec = context.spec
    if spec.train.resume and tf.train.latest_checkpoint(str(context.output_dir / CHECKPOINT_DIR)):
        return
    described = initialize_weights(model, spec.init, init_batches(spec, context.train_split))
    if distribute.is_chief():
        mlflow.set_tag("deeplabq.init", described)


def start_quantization(float_model, batches):
    """Fake-quantized copy of ``float_model``, its activation ranges calibrated on a few train batches.

    Batch norm is not frozen here: ``fit`` does it at ``quant.freeze_bn_delay``."""
    qat_model = quantization.quantize_model(float_model)
    if batches is not None:
        images = [images for images, _ in itertools.islice(batches, CALIBRATION_BATCHES)]
        quantization.calibrate_activation_ranges(qat_model, images)
    return qat_model


def freeze_bn_step(spec: RunSpec, switch_step: int) -> int | None:
    """``quant.freeze_bn_delay`` checked against the run: before the end, not before the switch to QAT."""
    freeze, steps = spec.quant.freeze_bn_delay, int(spec.train.steps)
    if freeze is None:
        return None
    freeze = int(freeze)
    require(freeze < steps, f"quant.freeze_bn_delay={freeze} is not before the end of training (train.steps="
                            f"{steps}): batch norm would never freeze (null = never)")
    require(freeze >= switch_step, f"quant.freeze_bn_delay={freeze} is before quant.delay_steps={switch_step}: "
                                   f"batch norm freezes in the quantized model, at or after the switch")
    return freeze
