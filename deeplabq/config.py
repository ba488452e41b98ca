"""Validation of a composed config, once, at the start of a run: every message names the key."""

from __future__ import annotations

from omegaconf import DictConfig

from deeplabq.model import spec_from_config

QUANT_MODES = ("float", "qat_delayed", "qat_finetune", "ptq")
PTQ_SCHEMES = ("dynamic_range", "float16", "int8")
INIT_SOURCES = ("scratch", "keras_imagenet", "deeplab_checkpoint", "run")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the value."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first impossible value (checked before any data or model is touched)."""
    try:
        spec_from_config(cfg).validate()
    except ValueError as error:
        raise ConfigError(str(error)) from error

    train = cfg.train
    _require(int(train.steps) > 0, f"train.steps must be > 0, got {train.steps}")
    _require(int(train.batch_size) > 0, f"train.batch_size must be > 0, got {train.batch_size}")
    _require(train.optimizer in ("momentum", "adam"),
             f"train.optimizer must be 'momentum' or 'adam', got {train.optimizer!r}")
    _require(train.learning_policy in ("poly", "constant"),
             f"train.learning_policy must be 'poly' or 'constant', got {train.learning_policy!r}")
    _require(float(train.learning_rate) > 0, f"train.learning_rate must be > 0, got {train.learning_rate}")
    _require(float(train.weight_decay) >= 0, f"train.weight_decay must be >= 0, got {train.weight_decay}")
    for key in ("log_every_steps", "checkpoint_every_steps"):
        _require(int(train[key]) > 0, f"train.{key} must be > 0, got {train[key]}")

    dataset = cfg.dataset
    _require(0 <= int(dataset.ignore_label) <= 255,
             f"dataset.ignore_label must be in 0..255, got {dataset.ignore_label}")
    _require(float(dataset.min_scale_factor) > 0 and
             float(dataset.min_scale_factor) <= float(dataset.max_scale_factor),
             f"dataset.min_scale_factor ({dataset.min_scale_factor}) must be > 0 and <= "
             f"dataset.max_scale_factor ({dataset.max_scale_factor})")
    if dataset.class_names is not None:
        _require(len(dataset.class_names) == int(dataset.num_classes),
                 f"dataset.class_names has {len(dataset.class_names)} names but dataset.num_classes is "
                 f"{dataset.num_classes}")

    quant = cfg.quant
    _require(quant.mode in QUANT_MODES, f"quant.mode must be one of {QUANT_MODES}, got {quant.mode!r}")
    _require(int(quant.delay_steps) >= 0, f"quant.delay_steps must be >= 0, got {quant.delay_steps}")
    if quant.mode == "qat_delayed":
        _require(int(quant.delay_steps) < int(train.steps),
                 f"quant.delay_steps={quant.delay_steps} is not before the end of training "
                 f"(train.steps={train.steps}): quantization would never switch on")
    if quant.mode in ("qat_delayed", "qat_finetune") and quant.freeze_bn_delay is not None:
        freeze, delay = int(quant.freeze_bn_delay), int(quant.delay_steps) if quant.mode == "qat_delayed" else 0
        _require(freeze < int(train.steps),
                 f"quant.freeze_bn_delay={freeze} is not before the end of training (train.steps={train.steps}): "
                 f"batch norm would never freeze (null = never)")
        _require(freeze >= delay,
                 f"quant.freeze_bn_delay={freeze} is before quant.delay_steps={delay}: batch norm freezes in the "
                 f"quantized model, at or after the switch")
        _require(quant.mode == "qat_finetune" or freeze > 0,
                 f"quant.freeze_bn_delay=0 freezes batch-norm statistics that were never trained (quant=qat_delayed "
                 f"starts from {cfg.init.source} weights): use a later step, or null to keep them training")
    if quant.mode == "ptq":
        _require(quant.scheme in PTQ_SCHEMES, f"quant.scheme must be one of {PTQ_SCHEMES}, got {quant.scheme!r}")
    if quant.mode in ("qat_finetune", "ptq"):
        _require(quant.float_checkpoint is not None,
                 f"quant={quant.mode} needs a converged float model: set quant.float_checkpoint=<run dir, "
                 f"checkpoint prefix or MLflow run id> (train one with `python train.py quant=float`)")
    _require(int(quant.calibration_samples) > 0,
             f"quant.calibration_samples must be > 0, got {quant.calibration_samples}")

    init = cfg.init
    _require(init.source in INIT_SOURCES, f"init.source must be one of {INIT_SOURCES}, got {init.source!r}")
    if init.source in ("deeplab_checkpoint", "run"):
        _require(init.path is not None, f"init.source={init.source} needs init.path")
    reestimate = init.get("reestimate_batch_norm") or 0
    _require(isinstance(reestimate, int) and not isinstance(reestimate, bool) and reestimate >= 0,
             f"init.reestimate_batch_norm must be a number of train batches >= 0, got {reestimate!r}")
    _require(reestimate == 0 or init.source != "scratch",
             f"init.reestimate_batch_norm={reestimate} re-estimates loaded batch-norm statistics: it needs "
             f"init.source other than scratch")

    export = cfg.export
    _require(export.input_type in ("uint8", "int8", "float32"),
             f"export.input_type must be uint8, int8 or float32, got {export.input_type!r}")
    _require(export.output in ("labels", "logits"),
             f"export.output must be 'labels' or 'logits', got {export.output!r}")
    for variant in export.ptq_variants:
        _require(variant in PTQ_SCHEMES, f"export.ptq_variants: unknown variant {variant!r}; use {PTQ_SCHEMES}")
    _require(int(export.int8_debug_images) >= 0,
             f"export.int8_debug_images must be >= 0, got {export.int8_debug_images}")
    _require(int(export.int8_float_worst_layers) >= 0,
             f"export.int8_float_worst_layers must be >= 0, got {export.int8_float_worst_layers}")
    _require(int(export.int8_float_worst_layers) == 0 or int(export.int8_debug_images) > 0,
             f"export.int8_float_worst_layers={export.int8_float_worst_layers} picks layers from the per-layer error "
             f"report: set export.int8_debug_images > 0")
    for threads in cfg.eval.latency_threads:
        _require(int(threads) > 0, f"eval.latency_threads must be positive, got {threads}")
