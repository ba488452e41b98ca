"""Quantization modes, one module each, registered by the value of ``quant.mode``.

Adding a mode is one module here (a :class:`QuantMode` subclass with ``@register``) and one
``conf/quant/<name>.yaml`` (``defaults: [common/keys@_here_, _self_]`` and ``mode: <name>``). Every module of
this package is imported here, so its mode registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from omegaconf import DictConfig

from deeplabq.config import RunSpec, require
from deeplabq.quant_modes.base import QuantMode, TrainContext, find, get, names, register, unregister

SUPPORT_MODULES = ("base", "common")

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")


def validate_config(cfg: DictConfig) -> tuple[RunSpec, QuantMode]:
    """The run's typed spec and its quant mode, after the generic checks and the mode's own
    (ConfigError naming the key)."""
    spec = RunSpec.from_config(cfg, training=True)
    mode = get(spec.quant.mode)
    spec.validate()
    precision = spec.train.mixed_precision
    require(precision is None or mode.mixed_precision,
            f"train.mixed_precision={precision} is for float training: quant={mode.name} trains or converts "
            f"fake-quantized layers, which stay float32 (tfmot, TFLite); set train.mixed_precision=null")
    mode.validate(spec)
    return spec, mode


__all__ = ["QuantMode", "TrainContext", "find", "get", "names", "register", "unregister", "validate_config"]
