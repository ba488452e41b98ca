"""The training side of the quant modes other than ``float``: delayed QAT, QAT fine-tuning, PTQ.

Each returns ``(model, float_model)``: the model whose artifacts the run deploys and the float model that
the float/PTQ artifacts are converted from (the same object when there is only one).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from deeplabq import checkpoints, quantization
from deeplabq.sources import resolve_source
from deeplabq.training import fit, init_batches, initialize_weights

CALIBRATION_BATCHES = 4  # train batches that set activation ranges before fake quantization starts


def load_float_checkpoint(model, quant_cfg) -> str:
    """Load ``quant.float_checkpoint`` (a float run dir, checkpoint prefix or MLflow run id) into ``model``."""
    if quant_cfg.float_checkpoint is None:
        raise ValueError(f"quant={quant_cfg.mode} needs quant.float_checkpoint (a float run dir, checkpoint or "
                         f"MLflow run id)")
    source = resolve_source(str(quant_cfg.float_checkpoint))
    if source.kind != "checkpoint" or source.quantized:
        raise ValueError(f"quant.float_checkpoint={quant_cfg.float_checkpoint} is not a float checkpoint "
                         f"({source.describe()})")
    checkpoints.load_run_weights(model, source.path)
    mlflow.set_tag("deeplabq.float_checkpoint", source.describe())
    return source.describe()


def start_quantization(float_model, batches):
    """Fake-quantized copy of ``float_model``, its activation ranges calibrated on a few train batches.

    Batch norm is not frozen here: ``fit`` does it at ``quant.freeze_bn_delay``."""
    qat_model = quantization.quantize_model(float_model)
    if batches is not None:
        images = [images for images, _ in itertools.islice(batches, CALIBRATION_BATCHES)]
        quantization.calibrate_activation_ranges(qat_model, images)
    return qat_model


def run_quant_mode(cfg: DictConfig, output_dir: Path, model, train_split):
    mode = cfg.quant.mode
    freeze_bn_at = None if cfg.quant.freeze_bn_delay is None else int(cfg.quant.freeze_bn_delay)
    if mode == "ptq":
        load_float_checkpoint(model, cfg.quant)
        return model, model
    if mode == "qat_finetune":
        load_float_checkpoint(model, cfg.quant)
        # Calibrate on the same augmented train pipeline the fine-tuning uses, then train with quantization on.
        return fit(model, cfg, output_dir, train_split, quantize_at=0, quantize_fn=start_quantization,
                   freeze_bn_at=freeze_bn_at), model
    if mode == "qat_delayed":
        mlflow.set_tag("deeplabq.init", initialize_weights(model, cfg.init, init_batches(cfg, train_split)))
        qat = fit(model, cfg, output_dir, train_split, quantize_at=int(cfg.quant.delay_steps),
                  quantize_fn=start_quantization, freeze_bn_at=freeze_bn_at)
        return qat, None
    raise ValueError(f"quant.mode={mode!r} is not a training mode")
