"""evaluate.py's job: score a TFLite file, a checkpoint, a run directory or an MLflow run on a dataset split,
in a run of its own (a child of the source's run when there is one)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from deeplabq import data as data_lib
from deeplabq import profiling, sources, tracking
from deeplabq.config import RunSpec
from deeplabq.evaluation import TFLiteError, TFLiteSegmenter, deploy_metrics, evaluate_keras, tflite_metrics


def fit_crop_to_file(cfg: DictConfig, path: Path, overrides: list[str]) -> DictConfig:
    """A TFLite file has a fixed input size: evaluate at it (``dataset.crop_size``) unless the user set one.
    A file that does not load is left for the evaluation to refuse, inside its (then FAILED) MLflow run."""
    try:
        height, width = TFLiteSegmenter(str(path)).input_hw
    except TFLiteError:
        return cfg
    if list(cfg.dataset.crop_size) == [height, width] or any(o.startswith("dataset.crop_size=") for o in overrides):
        return cfg
    fitted = cfg.copy()
    fitted.dataset.crop_size = [height, width]
    print(f"{path.name} takes {height}x{width} images: dataset.crop_size={[height, width]}")
    return fitted


def profile_file(path: Path, kind: str, split, spec: RunSpec, output_dir: Path) -> dict[str, float]:
    """``eval.profile_ops``: the per-op latency of the file (deeplabq.profiling) on the split's first image,
    printed, written to ``op_profile.csv`` (logged) and logged as ``<kind>/op_ms/<op type>`` metrics."""
    image, label = split.load(0)
    padded, _, _ = data_lib.preprocess_for_eval(image, label, spec.dataset)
    profile = profiling.profile_ops(path.read_bytes(), threads=max(spec.eval.latency_threads),
                                    runs=spec.eval.latency_runs, warmup=spec.eval.latency_warmup, image=padded)
    profile.write_csv(output_dir / "op_profile.csv")
    tracking.log_artifact(output_dir / "op_profile.csv")
    print(f"{path.name}, {tracking.cpu_features()}: {profiling.format_profile(profile, top=10)}")
    return {f"{kind}/op_ms/{op}": ms for op, ms in profile.by("op").items()}


def evaluate(cfg: DictConfig, output_dir) -> dict[str, float]:
    """A TFLite file, checkpoint, run dir or MLflow run id → metrics in a new MLflow run, a child of the
    source's run when the source belongs to one (whose config it then evaluates with)."""
    output_dir = Path(output_dir)
    tracking.setup_mlflow(cfg.tracking)  # a run id source is looked up in the configured store
    source = sources.resolve_source(cfg.source)
    overrides = tracking.command_line_overrides()
    if cfg.use_run_config:
        cfg = sources.with_run_architecture(cfg, source, overrides)
    kind = source.path.stem if source.kind == "tflite" else "keras"
    if source.kind == "tflite":
        cfg = fit_crop_to_file(cfg, source.path, overrides)
    cfg = tracking.with_run_name(cfg, f"eval {kind} {cfg.dataset.name}/{cfg.eval.split}")
    with tracking.tracked_run(cfg, output_dir, parent_run_id=source.run_id):
        mlflow.set_tags({"deeplabq.source": source.describe(), **(
            {"deeplabq.evaluated_run": source.run_id} if source.run_id else {})})
        spec = RunSpec.from_config(cfg)
        spec.validate()
        split = data_lib.open_split(spec.dataset, spec.eval.split)
        if cfg.get("check_data", True):
            data_lib.check_files(split)
        if source.kind == "tflite":
            metrics, _ = tflite_metrics(source.path, kind, split, spec.eval, spec.dataset)
            metrics[f"{kind}/size_bytes"] = source.path.stat().st_size
            if spec.eval.profile_ops:
                metrics.update(profile_file(source.path, kind, split, spec, output_dir))
        else:
            model = sources.load_keras_model(spec.model, source)
            metrics = evaluate_keras(model, split, spec.dataset, max_images=spec.eval.max_images).metrics(
                list(split.class_names), prefix="keras/")
        metrics.update(deploy_metrics(metrics, kind))
        tracking.log_metrics(metrics)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        print(f"{source.describe()} on {split.name}/{split.split} ({len(split)} images): "
              f"mIoU {metrics['deploy/miou']:.2f} %, pixel accuracy {metrics['deploy/pixel_accuracy']:.2f} %")
        return metrics
