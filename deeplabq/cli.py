"""What the thin entry points share: run one task function, turn user errors into one clear line."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from deeplabq.errors import UserError

# Errors that mean "your input is wrong": printed as one line, no traceback, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)

_sweep_failed = False


def mark_sweep_failed() -> None:
    """A job of this multirun failed (deeplabq.sweep's callback, in the process that launched the jobs)."""
    global _sweep_failed
    _sweep_failed = True


def exit_status() -> int:
    """What an entry point exits with once Hydra returns: 2 if a multirun job failed (each said why in one line),
    else 0. A single job that fails has exited already (run_task)."""
    return 2 if _sweep_failed else 0


def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_task(task, cfg: DictConfig) -> float:
    """Call ``task(cfg, output_dir)`` and return its ``deploy/miou`` (the value a sweeper optimizes).

    A user error (bad config value, dataset, checkpoint, run id) prints ``deeplabq: error: ...`` and exits
    with status 2; in a multirun the job returns NaN instead so the other jobs still run (its MLflow run is
    already marked FAILED).
    """
    try:
        metrics = task(cfg, Path(cfg.paths.output_dir))
    except USER_ERRORS as error:
        print(f"deeplabq: error: {error}", file=sys.stderr)
        if _in_multirun():
            return math.nan
        sys.exit(2)
    return float(metrics.get("deploy/miou", math.nan))
