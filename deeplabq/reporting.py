"""After training: evaluate the Keras model, export every TFLite artifact of the run, measure and log each."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from omegaconf import DictConfig

from deeplabq import data as data_lib
from deeplabq import evaluation, export, quantization, tracking
from deeplabq.console import native_output

# Each variant must agree this well with the Keras model it came from, or it is not kept.
MIN_AGREEMENT = {"float": 0.99, "float16": 0.97}


def planned_variants(cfg: DictConfig) -> list[str]:
    """The deployable TFLite artifacts of a run, by quant mode."""
    mode = cfg.quant.mode
    if mode == "float":
        return ["float", *cfg.export.ptq_variants]
    if mode == "ptq":
        return ["float", str(cfg.quant.scheme)]
    return ["qat_int8"]


def calibration_images(cfg: DictConfig, train_split, output_dir: Path) -> list[np.ndarray]:
    """``quant.calibration_samples`` train images (fixed seed), padded as for eval; the list is logged."""
    count = int(cfg.quant.calibration_samples)
    if count > len(train_split):
        raise ValueError(f"quant.calibration_samples={count} is larger than the '{train_split.split}' split "
                         f"({len(train_split)} images)")
    rng = np.random.default_rng(int(cfg.quant.calibration_seed))
    indices = sorted(rng.choice(len(train_split), size=count, replace=False).tolist())
    listing = output_dir / "calibration_images.txt"
    listing.write_text("".join(f"{train_split.describe(i)}\n" for i in indices))
    mlflow.log_artifact(str(listing))
    images = []
    for index in indices:
        image, _ = train_split.load(index)
        images.append(data_lib.preprocess_for_eval(image, None, cfg.dataset)[0])
    return images


def evaluate_and_export(cfg: DictConfig, output_dir: Path, model, float_model, train_split,
                        eval_split) -> dict[str, float]:
    """Keras metrics of the trained model (and of its float source), then every planned TFLite artifact."""
    max_images = cfg.eval.max_images
    metrics = evaluation.evaluate_keras(model, eval_split, cfg.dataset, max_images=max_images).metrics(
        list(eval_split.class_names), prefix="keras/")
    if float_model is not None and float_model is not model:
        metrics.update(evaluation.evaluate_keras(float_model, eval_split, cfg.dataset, max_images=max_images)
                       .metrics(list(eval_split.class_names), prefix="keras_float/"))
    tracking.log_metrics(metrics)
    variants = planned_variants(cfg)
    qat_model = model if cfg.quant.mode in ("qat_delayed", "qat_finetune") else None
    metrics.update(export_and_measure(cfg, output_dir, variants, float_model=float_model, qat_model=qat_model,
                                      train_split=train_split, eval_split=eval_split))
    deployable = "float" if cfg.quant.mode == "float" else variants[-1]
    if f"{deployable}/miou" in metrics:
        metrics["miou"] = metrics[f"{deployable}/miou"]
        tracking.log_metrics({"miou": metrics["miou"]})
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def export_and_measure(cfg: DictConfig, output_dir: Path, variants: list[str], *, train_split, eval_split,
                       float_model=None, qat_model=None) -> dict[str, float]:
    """Each variant: convert, validate against its Keras model, write, evaluate, time, log.

    A variant that fails is reported and skipped; the others are still exported and logged, then one
    ExportError names every failed variant (so the run ends FAILED with its good artifacts intact).
    """
    check_count = min(int(cfg.export.agreement_images), len(eval_split))
    check_images = [data_lib.preprocess_for_eval(eval_split.load(i)[0], None, cfg.dataset)[0]
                    for i in range(check_count)]
    representative = calibration_images(cfg, train_split, output_dir) if "int8" in variants else None
    tflite_dir = output_dir / "tflite"
    metrics, failures = {}, []
    for variant in variants:
        source = qat_model if variant == "qat_int8" else float_model
        try:
            if source is None:
                raise export.ExportError(f"TFLite variant '{variant}' needs a "
                                         f"{'QAT' if variant == 'qat_int8' else 'float'} model")
            float_layers = int8_float_layers(cfg, tflite_dir, source, representative) if variant == "int8" else []
            exported = export.export_variant(
                source, variant, tflite_dir / f"{variant}.tflite", check_images=check_images,
                export_cfg=cfg.export, representative_images=representative,
                min_agreement=MIN_AGREEMENT.get(variant, 0.0), float_layers=float_layers)
        except export.ExportError as error:
            print(f"error: {error}")
            mlflow.set_tag(f"deeplabq.export_error.{variant}", str(error)[:5000])
            failures.append(str(error))
            continue
        mlflow.log_artifact(str(exported.path), artifact_path="tflite")
        with tempfile.TemporaryDirectory() as tmp:
            ops_file = Path(tmp) / f"{variant}_ops.json"
            ops_file.write_text(json.dumps({"op_histogram": exported.op_histogram,
                                            "xnnpack_partitions": exported.xnnpack_partitions}, indent=1))
            mlflow.log_artifact(str(ops_file), artifact_path="tflite")
        variant_metrics = {
            **({f"{variant}/float_layers": len(float_layers)} if float_layers else {}),
            f"{variant}/size_bytes": exported.size_bytes,
            f"{variant}/agreement": exported.agreement,
            f"{variant}/xnnpack_partitions": exported.xnnpack_partitions,
            **evaluation.tflite_metrics(exported.path, variant, eval_split, cfg),
        }
        tracking.log_metrics(variant_metrics)
        metrics.update(variant_metrics)
    if failures:
        raise export.ExportError("; ".join(failures))
    return metrics


def int8_float_layers(cfg: DictConfig, tflite_dir: Path, float_model, representative) -> list[str]:
    """The layers the PTQ int8 file keeps in float: ``export.int8_float_layers`` plus the
    ``export.int8_float_worst_layers`` worst others of the per-layer error report, which is written first
    when ``export.int8_debug_images`` > 0. Tags the run with them; a failing report fails the int8 variant."""
    chosen = list(cfg.export.int8_float_layers)
    if int(cfg.export.int8_debug_images) > 0:
        try:
            rows = int8_error_report(cfg, tflite_dir, float_model, representative)
        except Exception as error:  # noqa: BLE001  (reported as the int8 variant's failure)
            raise export.ExportError(f"TFLite variant 'int8' failed: per-layer error report: "
                                     f"{type(error).__name__}: {error}") from error
        worst = [row["layer"] for row in rows if row["layer"] not in chosen]
        chosen += list(dict.fromkeys(worst))[: int(cfg.export.int8_float_worst_layers)]
    if chosen:
        mlflow.set_tag("deeplabq.int8_float_layers", ",".join(chosen))
    return chosen


def int8_error_report(cfg: DictConfig, tflite_dir: Path, float_model, representative) -> list[dict]:
    """Per-layer error of the PTQ int8 model (QuantizationDebugger) on the first ``export.int8_debug_images``
    calibration images, written and logged as ``tflite/int8_layer_errors.csv``; the rows, worst first."""
    with native_output():
        rows = quantization.int8_layer_errors(float_model, representative,
                                              representative[: int(cfg.export.int8_debug_images)],
                                              per_channel=bool(cfg.export.per_channel))
    table = io.StringIO()
    writer = csv.DictWriter(table, ["layer", "op", "rmse/scale", "max_abs_error/scale", "scale", "tensor"])
    writer.writeheader()
    writer.writerows(rows)
    report = tflite_dir / "int8_layer_errors.csv"
    export.write_atomically(report, table.getvalue().encode())
    mlflow.log_artifact(str(report), artifact_path="tflite")
    print("int8 per-layer error, worst first (rmse/scale; 0.29 is rounding alone): "
          + ", ".join(f"{row['layer']} {row['rmse/scale']:.2f}" for row in rows[:5]))
    return rows


def summary_table(metrics: dict[str, float], threads: list[int]) -> str:
    """Artifact | mIoU | delta vs float | size | latency per thread count | speed-up vs float."""
    variants = [k.split("/")[0] for k in metrics if k.endswith("/size_bytes")]
    head = ["artifact", "mIoU", "Δ vs float", "size (KB)"]
    head += [f"latency {t}t (ms)" for t in threads] + [f"speed-up {t}t" for t in threads]
    rows = [head]
    if "keras/miou" in metrics:
        rows.append(["keras", f"{100 * metrics['keras/miou']:.2f}", "", "", *[""] * (2 * len(threads))])
    base = "float" if "float/miou" in metrics else None
    for v in variants:
        miou = metrics.get(f"{v}/miou", float("nan"))
        delta = "" if base is None or v == base else f"{100 * (miou - metrics[f'{base}/miou']):+.2f}"
        lat = [metrics.get(f"{v}/latency_ms_t{t}", float("nan")) for t in threads]
        speed = ["" if base is None else f"{metrics[f'{base}/latency_ms_t{t}'] / lat_t:.2f}x"
                 for t, lat_t in zip(threads, lat, strict=True)]
        rows.append([v, f"{100 * miou:.2f}", delta, f"{metrics[f'{v}/size_bytes'] / 1024:.1f}",
                     *[f"{x:.2f}" for x in lat], *speed])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def print_summary(cfg: DictConfig, metrics: dict[str, float]) -> None:
    run = mlflow.active_run()
    print("\n" + summary_table(metrics, [int(t) for t in cfg.eval.latency_threads]))
    if run is not None:
        print(f"\nMLflow run {run.info.run_id} ({run.info.run_name}) in {cfg.tracking.tracking_uri}")
        print(f"  browse: mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}")
