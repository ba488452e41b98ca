"""Typed config at the task boundary: a task turns the composed DictConfig into these specs once, and the
libraries take specs, not the config. Each spec checks its own values; every message names the key.

The quant mode's own checks (delay before the end, float checkpoint given, ...) belong to the mode:
``deeplabq.quant_modes.validate_config`` runs both.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from omegaconf import DictConfig, OmegaConf

from deeplabq.errors import ConfigError
from deeplabq.model import DeepLabSpec, spec_from_config

PTQ_SCHEMES = ("dynamic_range", "float16", "int8")
STRATEGIES = ("default", "mirrored", "multi_worker")  # train.strategy (deeplabq.distribute)
MIXED_PRECISION = ("mixed_float16", "mixed_bfloat16")  # train.mixed_precision, besides null
INIT_SOURCES = ("scratch", "keras_imagenet", "deeplab_checkpoint", "run")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _values(node, cls) -> dict:
    """The fields of ``cls`` read from a config node (interpolations resolved); a missing key is named."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    missing = [f.name for f in fields(cls) if f.name not in plain and f.default is MISSING]
    if missing:
        raise ConfigError(f"config node has no key {missing[0]!r} ({cls.__name__})")
    return {f.name: plain[f.name] for f in fields(cls) if f.name in plain}


@dataclass(frozen=True)
class TrainSpec:
    """``train.*`` plus the run-level ``seed`` and ``resume``."""

    steps: int
    batch_size: int
    optimizer: str
    learning_rate: float
    learning_policy: str
    learning_power: float
    end_learning_rate: float
    momentum: float
    adam_epsilon: float
    weight_decay: float
    fine_tune_batch_norm: bool
    batch_norm_decay: float
    log_every_steps: int
    checkpoint_every_steps: int
    strategy: str = "default"
    sync_batch_norm: bool = True
    mixed_precision: str | None = None
    seed: int = 0
    resume: bool = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainSpec:
        return cls(**_values(cfg.train, cls), seed=int(cfg.get("seed", 0)), resume=bool(cfg.get("resume", False)))

    def validate(self) -> None:
        require(int(self.steps) > 0, f"train.steps must be > 0, got {self.steps}")
        require(int(self.batch_size) > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        require(self.optimizer in ("momentum", "adam"),
                f"train.optimizer must be 'momentum' or 'adam', got {self.optimizer!r}")
        require(self.learning_policy in ("poly", "constant"),
                f"train.learning_policy must be 'poly' or 'constant', got {self.learning_policy!r}")
        require(float(self.learning_rate) > 0, f"train.learning_rate must be > 0, got {self.learning_rate}")
        require(float(self.weight_decay) >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("log_every_steps", "checkpoint_every_steps"):
            require(int(getattr(self, key)) > 0, f"train.{key} must be > 0, got {getattr(self, key)}")
        require(self.strategy in STRATEGIES, f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        require(self.mixed_precision is None or self.mixed_precision in MIXED_PRECISION,
                f"train.mixed_precision must be null or one of {MIXED_PRECISION}, got {self.mixed_precision!r}")


@dataclass(frozen=True)
class QuantSpec:
    """``quant.*``: every quant option has the same keys (conf/quant/common/keys.yaml), so sweeps compose."""

    mode: str
    delay_steps: int = 0
    float_checkpoint: str | None = None
    scheme: str | None = None
    calibration_samples: int = 100
    calibration_seed: int = 0
    freeze_bn_delay: int | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> QuantSpec:
        return cls(**_values(cfg.quant, cls))

    def validate(self) -> None:
        require(int(self.delay_steps) >= 0, f"quant.delay_steps must be >= 0, got {self.delay_steps}")
        require(int(self.calibration_samples) > 0,
                f"quant.calibration_samples must be > 0, got {self.calibration_samples}")


@dataclass(frozen=True)
class InitSpec:
    """``init.*``: the weights a training run starts from."""

    source: str = "scratch"
    path: str | None = None
    initialize_last_layer: bool = True
    reestimate_batch_norm: int = 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> InitSpec:
        values = _values(cfg.init, cls)
        values["reestimate_batch_norm"] = values.get("reestimate_batch_norm") or 0
        return cls(**values)

    def validate(self) -> None:
        require(self.source in INIT_SOURCES, f"init.source must be one of {INIT_SOURCES}, got {self.source!r}")
        if self.source in ("deeplab_checkpoint", "run"):
            require(self.path is not None, f"init.source={self.source} needs init.path")
        count = self.reestimate_batch_norm
        require(isinstance(count, int) and not isinstance(count, bool) and count >= 0,
                f"init.reestimate_batch_norm must be a number of train batches >= 0, got {count!r}")
        require(count == 0 or self.source != "scratch",
                f"init.reestimate_batch_norm={count} re-estimates loaded batch-norm statistics: it needs "
                f"init.source other than scratch")


@dataclass(frozen=True)
class ExportSpec:
    """``export.*``: how every TFLite file is converted and checked."""

    input_type: str = "uint8"
    output: str = "labels"
    per_channel: bool = True
    ptq_variants: tuple[str, ...] = ()
    agreement_images: int = 4
    int8_debug_images: int = 0
    int8_float_layers: tuple[str, ...] = ()
    int8_float_worst_layers: int = 0
    isolate_conversion: bool = True  # convert in a child process: a native crash fails one variant, not the run
    int8_fold_input: bool = True  # integer files: input normalization folded into the uint8 input (no MUL/ADD)
    int8_float_tail: bool = True  # integer files: resize of the logits and ArgMax in float (faster on XNNPACK)
    float16_arithmetic: bool = False  # float16 file: XNNPACK may compute in fp16 (ARMv8.2+), not only store fp16

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ExportSpec:
        values = _values(cfg.export, cls)
        return cls(**{**values, "ptq_variants": tuple(values.get("ptq_variants") or ()),
                      "int8_float_layers": tuple(values.get("int8_float_layers") or ())})

    def validate(self) -> None:
        require(self.input_type in ("uint8", "int8", "float32"),
                f"export.input_type must be uint8, int8 or float32, got {self.input_type!r}")
        require(self.output in ("labels", "logits"),
                f"export.output must be 'labels' or 'logits', got {self.output!r}")
        for variant in self.ptq_variants:
            require(variant in PTQ_SCHEMES, f"export.ptq_variants: unknown variant {variant!r}; use {PTQ_SCHEMES}")
        require(int(self.int8_debug_images) >= 0,
                f"export.int8_debug_images must be >= 0, got {self.int8_debug_images}")
        require(int(self.int8_float_worst_layers) >= 0,
                f"export.int8_float_worst_layers must be >= 0, got {self.int8_float_worst_layers}")
        require(int(self.int8_float_worst_layers) == 0 or int(self.int8_debug_images) > 0,
                f"export.int8_float_worst_layers={self.int8_float_worst_layers} picks layers from the per-layer "
                f"error report: set export.int8_debug_images > 0")


@dataclass(frozen=True)
class EvalSpec:
    """``eval.*``: which split is scored and how each file is timed."""

    split: str
    max_images: int | None = None
    latency_threads: tuple[int, ...] = (1,)
    latency_warmup: int = 2
    latency_runs: int = 10
    profile_ops: bool = False  # evaluate.py on a TFLite file: also its per-op latency (deeplabq.profiling)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EvalSpec:
        values = _values(cfg.eval, cls)
        return cls(**{**values, "latency_threads": tuple(int(t) for t in values["latency_threads"])})

    def validate(self) -> None:
        for threads in self.latency_threads:
            require(int(threads) > 0, f"eval.latency_threads must be positive, got {threads}")


def validate_dataset(dataset: DictConfig) -> None:
    """The ``dataset.*`` values a reader cannot check by itself (the node goes to deeplabq.data as is)."""
    require(0 <= int(dataset.ignore_label) <= 255,
            f"dataset.ignore_label must be in 0..255, got {dataset.ignore_label}")
    require(float(dataset.min_scale_factor) > 0 and float(dataset.min_scale_factor) <= float(dataset.max_scale_factor),
            f"dataset.min_scale_factor ({dataset.min_scale_factor}) must be > 0 and <= "
            f"dataset.max_scale_factor ({dataset.max_scale_factor})")
    if dataset.class_names is not None:
        require(len(dataset.class_names) == int(dataset.num_classes),
                f"dataset.class_names has {len(dataset.class_names)} names but dataset.num_classes is "
                f"{dataset.num_classes}")


@dataclass(frozen=True)
class RunSpec:
    """Everything a job's libraries need, typed. ``train`` and ``init`` are None outside train.py; ``dataset``
    is the dataset node itself, which the data readers read."""

    model: DeepLabSpec
    quant: QuantSpec
    export: ExportSpec
    eval: EvalSpec
    dataset: DictConfig
    train: TrainSpec | None = None
    init: InitSpec | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, *, training: bool = False) -> RunSpec:
        """The specs of ``cfg``; ``train`` and ``init`` only for a training job (``training``), as other jobs'
        configs may carry a partial ``train`` node (``smoke=tiny`` sets a few of its keys everywhere)."""
        try:
            model = spec_from_config(cfg)
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from error
        return cls(model=model, quant=QuantSpec.from_config(cfg), export=ExportSpec.from_config(cfg),
                   eval=EvalSpec.from_config(cfg), dataset=cfg.dataset,
                   train=TrainSpec.from_config(cfg) if training else None,
                   init=InitSpec.from_config(cfg) if training else None)

    def validate(self) -> None:
        """Raise ConfigError for the first impossible value (before any data or model is touched)."""
        try:
            self.model.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        for part in (self.train, self.quant, self.init, self.export, self.eval):
            if part is not None:
                part.validate()
        validate_dataset(self.dataset)
