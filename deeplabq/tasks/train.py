"""train.py's job: train a model in its quant mode, then evaluate, export, measure and log every artifact."""

from __future__ import annotations

from pathlib import Path

import mlflow
import tf_keras as keras
from omegaconf import DictConfig

from deeplabq import data as data_lib
from deeplabq import distribute, quant_modes, reporting, tracking
from deeplabq.model import build_deeplab


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, float]:
    """Run one training job (any quant mode) and return its metrics (``deploy/*`` are the shipped file's).

    A worker of ``train.strategy=multi_worker`` other than the chief trains its share and returns no metrics:
    it opens no MLflow run and keeps no checkpoint or file."""
    output_dir = Path(output_dir)
    if not distribute.chief_process(str(cfg.train.get("strategy", "default"))):
        return _train(cfg, output_dir, chief=False)
    mode = quant_modes.find(cfg.quant.mode)  # an unknown mode still gets its (FAILED) run, named without parts
    name = tracking.run_name(cfg, mode.run_name_parts(cfg.quant) if mode else ())
    with tracking.tracked_run(cfg, output_dir, resume=bool(cfg.resume), name=name):
        return _train(cfg, output_dir, chief=True)


def _train(cfg: DictConfig, output_dir: Path, chief: bool) -> dict[str, float]:
    spec, mode = quant_modes.validate_config(cfg)
    if chief:
        mlflow.set_tags(mode.tags(spec.quant))
    keras.utils.set_random_seed(int(spec.train.seed))
    train_split = data_lib.open_split(spec.dataset, spec.dataset.train_split)
    eval_split = data_lib.open_split(spec.dataset, spec.eval.split)
    if cfg.get("check_data", True):  # every file, before step 1: a bad eval image must not waste the run
        data_lib.check_files(train_split, eval_split)
    plan = mode.export_plan(spec)
    if "int8" in plan.variants:
        reporting.check_calibration_count(spec.quant, train_split)
    context = quant_modes.TrainContext(spec, output_dir, train_split)
    if distribute.is_plain(spec.train):
        model, float_model = mode.train(build_deeplab(spec.model), context)
    else:
        with distribute.training_scope(spec.train):
            model, float_model = mode.train(build_deeplab(spec.model), context)
            same = float_model is model
            trained = distribute.snapshot(model), None if same else distribute.snapshot(float_model)
        # Export, evaluation and conversion take plain float32 copies, built outside the strategy.
        model = distribute.rebuild(trained[0], spec.model)
        float_model = model if same else distribute.rebuild(trained[1], spec.model)
    if not chief:
        return {}
    metrics = reporting.evaluate_and_export(spec, plan, output_dir, model, float_model, train_split, eval_split)
    reporting.print_summary(metrics, spec.eval.latency_threads, output_dir)
    return metrics
