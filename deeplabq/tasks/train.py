"""train.py's job: train a model in its quant mode, then evaluate, export, measure and log every artifact."""

from __future__ import annotations

from pathlib import Path

import mlflow
import tf_keras as keras
from omegaconf import DictConfig

from deeplabq import data as data_lib
from deeplabq import export, quant_modes, reporting, tracking
from deeplabq.model import build_deeplab


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    """Run one training job (any quant mode) and return its metrics (``deploy/*`` are the shipped file's)."""
    output_dir = Path(output_dir)
    mode = quant_modes.find(cfg.quant.mode)  # an unknown mode still gets its (FAILED) run, named without parts
    name = tracking.run_name(cfg, mode.run_name_parts(cfg.quant) if mode else ())
    with tracking.tracked_run(cfg, output_dir, resume=bool(cfg.resume), name=name):
        spec, mode = quant_modes.validate_config(cfg)
        mlflow.set_tags(mode.tags(spec.quant))
        keras.utils.set_random_seed(int(spec.train.seed))
        train_split = data_lib.open_split(spec.dataset, spec.dataset.train_split)
        eval_split = data_lib.open_split(spec.dataset, spec.eval.split)
        if cfg.get("check_data", True):  # every file, before step 1: a bad eval image must not waste the run
            data_lib.check_files(train_split, eval_split)
        plan = mode.export_plan(spec)
        if set(export.CALIBRATED) & set(plan.variants):
            reporting.check_calibration_count(spec.quant, train_split)
        model, float_model = mode.train(build_deeplab(spec.model),
                                        quant_modes.TrainContext(spec, output_dir, train_split))
        metrics = reporting.evaluate_and_export(spec, plan, output_dir, model, float_model, train_split, eval_split)
        reporting.print_summary(metrics, spec.eval.latency_threads, output_dir)
        return metrics
