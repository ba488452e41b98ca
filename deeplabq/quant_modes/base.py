"""The quant-mode plugin interface and its registry.

A quant mode is one module in this package: a :class:`QuantMode` subclass decorated with :func:`register`,
plus its ``conf/quant/<name>.yaml``. It declares its own checks, how it trains (or loads) the model, which
TFLite files the run exports and which one it ships. Nothing outside the registry compares ``quant.mode``
values: the train job looks the mode up by name (TF Model Garden's ``official/core/registry.py`` pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import tf_keras as keras

from deeplabq.config import ConfigError, QuantSpec, RunSpec
from deeplabq.data import SegmentationSplit
from deeplabq.export import ExportPlan


@dataclass(frozen=True)
class TrainContext:
    """What a mode's training hook gets besides the freshly built model."""

    spec: RunSpec
    output_dir: Path
    train_split: SegmentationSplit


class QuantMode:
    """One value of ``quant.mode``. Subclasses set ``name`` and override what differs."""

    name: ClassVar[str]
    # Whether train.mixed_precision may be set: only float training. Fake quantization (tfmot) and TFLite
    # conversion are float32, and a mode that trains fake-quantized layers refuses mixed precision.
    mixed_precision: ClassVar[bool] = False

    def validate(self, spec: RunSpec) -> None:
        """Checks of the mode's own keys (ConfigError naming the key); the generic ones have run already."""

    def run_name_parts(self, quant: QuantSpec) -> list[str]:
        """What follows the mode in the run's name (``qat_delayed-d100-...``)."""
        return []

    def tags(self, quant: QuantSpec) -> dict[str, str]:
        """Extra MLflow tags of the run (sweep tables read them)."""
        return {}

    def export_plan(self, spec: RunSpec) -> ExportPlan:
        """The TFLite files the run exports, the one it ships and the float metric the shipped one is
        compared with."""
        raise NotImplementedError

    def train(self, model: keras.Model, context: TrainContext) -> tuple[keras.Model, keras.Model | None]:
        """Train (or load) ``model``; return the model whose files the run deploys and the float model the
        float/PTQ files are converted from (the same object when there is one model; None when there is none)."""
        raise NotImplementedError


_REGISTRY: dict[str, QuantMode] = {}


def register(cls: type[QuantMode]) -> type[QuantMode]:
    """Class decorator: make ``cls`` the mode named ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"quant mode {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def find(name: str) -> QuantMode | None:
    return _REGISTRY.get(str(name))


def get(name: str) -> QuantMode:
    """The registered mode called ``name``; ConfigError naming ``quant.mode`` otherwise."""
    mode = find(name)
    if mode is None:
        raise ConfigError(f"quant.mode must be one of {names()}, got {name!r}")
    return mode
