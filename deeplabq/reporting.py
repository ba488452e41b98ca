"""After training: evaluate the Keras model, export every TFLite artifact of the run, measure and log each,
ship one, draw the run's figures and print its summary."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from deeplabq import conversion_process, evaluation, export, figures, int8_control, tracking
from deeplabq import data as data_lib
from deeplabq.config import ExportSpec, QuantSpec, RunSpec
from deeplabq.console import native_output, progress
from deeplabq.errors import ConfigError
from deeplabq.export import ExportPlan

# Each variant must agree this well with the Keras model it came from (fraction of pixels with the same label
# on export.agreement_images eval images), or it is not kept. Measured on trained models (synthetic default
# 300 steps; CamVid 1200 steps): float 1.0, float16 0.9996-0.9999, dynamic_range 0.995-0.997, int8 0.984-0.993
# (per-tensor 0.988), qat_int8 0.986-0.994. Really broken int8 files of the synthetic default: input scale wrong
# by 255 (calibrated on 0..1) 0.71, by 2 0.80, ranges calibrated on noise 0.81; per-tensor int8 of the Zen 5 main
# job (mIoU 11.0 against float 58.8) 0.47. The background alone covers ~70% of the pixels, so a file that has
# lost the objects still agrees on that much.
MIN_AGREEMENT = {"float": 0.99, "float16": 0.97, "dynamic_range": 0.95, "int8": 0.9, "qat_int8": 0.9,
                 "int16x8": 0.9}  # 16x8 is at least as close as int8; int8's floor until it is measured


def check_calibration_count(quant: QuantSpec, train_split) -> None:
    """Fail before any work when int8 calibration asks for more train images than the split has."""
    if int(quant.calibration_samples) > len(train_split):
        raise ConfigError(f"quant.calibration_samples={quant.calibration_samples} is larger than the "
                         f"'{train_split.split}' split ({len(train_split)} images)")


def calibration_images(quant: QuantSpec, dataset_cfg, train_split, output_dir: Path) -> list[np.ndarray]:
    """``quant.calibration_samples`` train images (fixed seed), padded as for eval; the list is logged."""
    check_calibration_count(quant, train_split)
    rng = np.random.default_rng(int(quant.calibration_seed))
    indices = sorted(rng.choice(len(train_split), size=int(quant.calibration_samples), replace=False).tolist())
    listing = output_dir / "calibration_images.txt"
    listing.write_text("".join(f"{train_split.describe(i)}\n" for i in indices))
    tracking.log_artifact(listing)
    images = []
    for index in progress(indices, desc="calibration images"):
        image, _ = train_split.load(index)
        images.append(data_lib.preprocess_for_eval(image, None, dataset_cfg)[0])
    return images


def evaluate_and_export(spec: RunSpec, plan: ExportPlan, output_dir: Path, model, float_model, train_split,
                        eval_split) -> dict[str, float]:
    """Keras metrics of the trained model (and of its float source), then every TFLite artifact of ``plan``,
    the ``deploy/*`` metrics of the one the run ships, and the run's figures."""
    max_images, names = spec.eval.max_images, list(eval_split.class_names)
    confusions = {"keras": evaluation.evaluate_keras(model, eval_split, spec.dataset, max_images=max_images)}
    metrics = confusions["keras"].metrics(names, prefix="keras/")
    if float_model is not None and float_model is not model:
        metrics.update(evaluation.evaluate_keras(float_model, eval_split, spec.dataset, max_images=max_images)
                       .metrics(names, prefix="keras_float/"))
    tracking.log_metrics(metrics)
    failure = None
    try:
        metrics.update(export_and_measure(spec, output_dir, list(plan.variants), float_model=float_model,
                                          qat_model=model if plan.qat else None, train_split=train_split,
                                          eval_split=eval_split, confusions=confusions))
    except export.ExportError as error:  # the good artifacts are kept and reported; the run still fails
        failure = error
    metrics.update(ship(metrics, plan.shipped, plan.float_reference))
    log_figures(output_dir, eval_split, spec.dataset, confusions, plan.shipped,
                output_dir / "tflite" / f"{plan.shipped}.tflite", max_images)
    if failure is not None:
        raise failure  # no metrics.json: a run folder that has one is complete (compare.py reuses it)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def ship(metrics: dict[str, float], artifact: str, reference: str | None) -> dict[str, float]:
    """Log the ``deploy/*`` metrics of ``artifact`` and tag the run with it and its file."""
    shipped = evaluation.deploy_metrics(metrics, artifact, reference)
    if shipped:
        tracking.log_metrics(shipped)
        mlflow.set_tags({"deeplabq.deploy_artifact": artifact, "deeplabq.deploy_file": f"tflite/{artifact}.tflite"})
    return shipped


def log_figures(output_dir: Path, split, dataset_cfg, confusions: dict, shipped: str, shipped_file: Path,
                max_images: int | None, samples: int = 4) -> None:
    """figures/per_class_iou.png (every artifact), figures/confusion_matrix.png and figures/samples.png
    (image | ground truth | prediction) of the shipped artifact, written and logged to MLflow."""
    names = list(split.class_names)
    folder = output_dir / "figures"
    ious = {kind: dict(zip(names, 100 * confusion.per_class_iou(), strict=False))  # percent
            for kind, confusion in confusions.items()}
    paths = [figures.per_class_iou_figure(ious, names, folder / "per_class_iou.png",
                                          title=f"Per-class IoU on {split.name}/{split.split} (%)")]
    if shipped in confusions:
        figures.confusion_matrix_figure(confusions[shipped].matrix, names, folder / "confusion_matrix.png",
                                        title=f"Confusion of {shipped}.tflite (% of each true class)")
        paths.append(folder / "confusion_matrix.png")
    if shipped_file.is_file():
        segmenter = evaluation.TFLiteSegmenter(str(shipped_file))
        rows = []
        for index in range(min(samples, len(split) if max_images is None else min(max_images, len(split)))):
            image, label = split.load(index)
            padded, _, valid = data_lib.preprocess_for_eval(image, None, dataset_cfg)
            rows.append((image, label, data_lib.postprocess_labels(segmenter.predict(padded), valid, label.shape)))
        paths.append(figures.overlay_figure(rows, split.num_classes, split.ignore_label, folder / "samples.png",
                                            title=f"{shipped}.tflite: image | ground truth | prediction"))
    for path in paths:
        tracking.log_artifact(path, "figures")


def export_and_measure(spec: RunSpec, output_dir: Path, variants: list[str], *, train_split, eval_split,
                       float_model=None, qat_model=None, confusions: dict | None = None) -> dict[str, float]:
    """Each variant: convert, validate against its Keras model, write, evaluate, time, log.

    A variant that fails is reported and skipped; the others are still exported and logged, then one
    ExportError names every failed variant (so the run ends FAILED with its good artifacts intact).
    """
    check_count = min(int(spec.export.agreement_images), len(eval_split))
    check_images = [data_lib.preprocess_for_eval(eval_split.load(i)[0], None, spec.dataset)[0]
                    for i in range(check_count)]
    representative = (calibration_images(spec.quant, spec.dataset, train_split, output_dir)
                      if set(export.CALIBRATED) & set(variants) else None)
    if representative is not None:  # what the int8 / int16x8 files were converted from (null keys: per_channel)
        corrections = [name for name, on in (("cross_layer_equalization", spec.export.equalize),
                                             ("bias_correction", spec.export.correct_bias)) if on]
        mlflow.set_tag("deeplabq.ptq_corrections", ",".join(corrections) or "none")
    failures = []
    if "int8" in variants and float_model is not None and spec.export.int8_max_drop is not None:
        try:  # the float layers of the int8 file, chosen by measuring candidates against the budget
            spec = int8_control.with_controlled_float_layers(spec, output_dir, float_model, representative, eval_split)
        except export.ExportError as error:
            print(f"error: {error}")
            mlflow.set_tag("deeplabq.export_error.int8", str(error)[:5000])
            failures.append(str(error))
            variants = [variant for variant in variants if variant != "int8"]
    tflite_dir = output_dir / "tflite"
    sources = {variant: qat_model if variant == "qat_int8" else float_model for variant in variants}
    converted = (convert_in_child(spec, sources, representative) if spec.export.isolate_conversion else {})
    metrics = {}
    for variant in progress(variants, desc="export", unit="file"):
        source = sources[variant]
        path = tflite_dir / f"{variant}.tflite"
        try:
            if source is None:
                raise export.ExportError(f"TFLite variant '{variant}' needs a "
                                         f"{'QAT' if variant == 'qat_int8' else 'float'} model")
            if variant in converted:  # converted in the child process: validated and written here
                child = converted[variant]
                float_layers = (record_int8_float_layers(spec.export, tflite_dir, child.layer_errors)
                                if variant == "int8" else [])
                if child.error is not None:
                    raise export.ExportError(child.error)
                exported = export.validate_and_write(child.tflite, source, variant, path, check_images=check_images,
                                                     min_agreement=MIN_AGREEMENT[variant])
            else:
                float_layers = (int8_float_layers(spec.export, tflite_dir, source, representative)
                                if variant == "int8" else [])
                exported = export.export_variant(
                    source, variant, path, check_images=check_images, export_cfg=spec.export,
                    representative_images=representative, min_agreement=MIN_AGREEMENT[variant],
                    float_layers=float_layers)
        except export.ExportError as error:
            print(f"error: {error}")
            mlflow.set_tag(f"deeplabq.export_error.{variant}", str(error)[:5000])
            failures.append(str(error))
            continue
        tracking.log_artifact(exported.path, "tflite")
        with tempfile.TemporaryDirectory() as tmp:
            ops_file = Path(tmp) / f"{variant}_ops.json"
            ops_file.write_text(json.dumps({"op_histogram": exported.op_histogram,
                                            "xnnpack_partitions": exported.xnnpack_partitions}, indent=1))
            tracking.log_artifact(ops_file, "tflite")
        quality, confusion = evaluation.tflite_metrics(exported.path, variant, eval_split, spec.eval,
                                                      spec.dataset)
        if confusions is not None:
            confusions[variant] = confusion
        variant_metrics = {
            **({f"{variant}/float_layers": len(float_layers)} if float_layers else {}),
            f"{variant}/size_bytes": exported.size_bytes,
            f"{variant}/agreement": exported.agreement,
            f"{variant}/xnnpack_partitions": exported.xnnpack_partitions,
            **quality,
        }
        tracking.log_metrics(variant_metrics)
        metrics.update(variant_metrics)
    if failures:
        raise export.ExportError("; ".join(failures))
    return metrics


def convert_in_child(spec: RunSpec, sources: dict, representative) -> dict:
    """Every variant with a source model, converted in one child process (deeplabq.conversion_process): a
    converter that crashes fails its variant only."""
    variants = [variant for variant, source in sources.items() if source is not None]
    if not variants:
        return {}
    models = {conversion_process.source_kind(variant): sources[variant] for variant in variants}
    return conversion_process.convert_in_child(spec.model, models, variants, spec.export, representative)


def int8_float_layers(export_spec: ExportSpec, tflite_dir: Path, float_model, representative) -> list[str]:
    """The layers the PTQ int8 file keeps in float (converting in this process): ``export.int8_float_layers``
    plus the ``export.int8_float_worst_layers`` worst others of the per-layer error report, which is run first
    when ``export.int8_debug_images`` > 0. A failing report fails the int8 variant."""
    report = None
    if int(export_spec.int8_debug_images) > 0:
        try:
            with native_output():
                report = export.int8_layer_report(export_spec, float_model, representative)
        except Exception as error:  # noqa: BLE001  (reported as the int8 variant's failure)
            raise export.conversion_failure("int8", error, stage="per-layer error report: ") from error
    return record_int8_float_layers(export_spec, tflite_dir, report)


def record_int8_float_layers(export_spec: ExportSpec, tflite_dir: Path, report: list[dict] | None) -> list[str]:
    """Write and log the per-layer error ``report`` (if it ran) as ``tflite/int8_layer_errors.csv``, tag the run
    with the layers the int8 file keeps in float, and return them."""
    if report is not None:
        write_int8_error_report(tflite_dir, report)
    chosen = export.int8_float_layers_of(export_spec, report)
    if chosen:
        mlflow.set_tag("deeplabq.int8_float_layers", ",".join(chosen))
    return chosen


def write_int8_error_report(tflite_dir: Path, rows: list[dict]) -> None:
    """The per-layer error of the PTQ int8 model (QuantizationDebugger), worst first, written and logged as
    ``tflite/int8_layer_errors.csv``; its five worst layers are printed."""
    table = io.StringIO()
    writer = csv.DictWriter(table, ["layer", "op", "rmse/scale", "max_abs_error/scale", "scale", "tensor"])
    writer.writeheader()
    writer.writerows(rows)
    report = tflite_dir / "int8_layer_errors.csv"
    export.write_atomically(report, table.getvalue().encode())
    tracking.log_artifact(report, "tflite")
    print("int8 per-layer error, worst first (rmse/scale; 0.29 is rounding alone): "
          + ", ".join(f"{row['layer']} {row['rmse/scale']:.2f}" for row in rows[:5]))


def summary_table(metrics: dict[str, float], threads: list[int]) -> str:
    """Artifact | mIoU (%) | delta vs float | size | latency per thread count | speed-up vs float; the shipped
    artifact (the one whose metrics are also ``deploy/*``) is marked with ``*``."""
    variants = evaluation.artifacts_in(metrics)
    shipped = next((v for v in variants if metrics.get(f"{v}/miou") == metrics.get("deploy/miou")
                    and metrics.get(f"{v}/size_bytes") == metrics.get("deploy/size_bytes")), None)
    head = ["artifact", "mIoU (%)", "Δ vs float", "size (KB)"]
    head += [f"latency {t}t (ms)" for t in threads] + [f"speed-up {t}t" for t in threads]
    rows = [head]
    if "keras/miou" in metrics:
        rows.append(["keras", f"{metrics['keras/miou']:.2f}", "", "", *[""] * (2 * len(threads))])
    base = "float" if "float/miou" in metrics else None
    for v in variants:
        miou = metrics.get(f"{v}/miou", float("nan"))
        delta = "" if base is None or v == base else f"{miou - metrics[f'{base}/miou']:+.2f}"
        lat = [metrics.get(f"{v}/latency_ms_t{t}", float("nan")) for t in threads]
        speed = ["" if base is None else f"{metrics[f'{base}/latency_ms_t{t}'] / lat_t:.2f}x"
                 for t, lat_t in zip(threads, lat, strict=True)]
        slow = " †" if metrics.get(f"{v}/xnnpack_partitions") == 0 else ""  # no XNNPACK: TFLite's own kernels
        rows.append([v + (" *" if v == shipped else "") + slow, f"{miou:.2f}", delta,
                     f"{metrics[f'{v}/size_bytes'] / 1024:.1f}", *[f"{x:.2f}" for x in lat], *speed])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    if any(metrics.get(f"{v}/xnnpack_partitions") == 0 for v in variants):
        lines.append("† no op runs in XNNPACK (e.g. int16x8: XNNPACK has no 16-bit kernels): timed on TFLite's "
                     "own kernels")
    if shipped:
        lines.append(f"* shipped: tflite/{shipped}.tflite (its metrics are also logged as deploy/*)")
    return "\n".join(lines)


def print_summary(metrics: dict[str, float], threads, output_dir: Path) -> None:
    print("\n" + summary_table(metrics, [int(t) for t in threads]))
    print_run_location(output_dir)


def print_run_location(output_dir: Path) -> None:
    """Where the run is: its MLflow run, output folder and the UI command and page."""
    run = mlflow.active_run()
    if run is None:
        return
    print(f"\nMLflow run {run.info.run_id} ({run.info.run_name}), files in {output_dir}")
    print(tracking.browse_lines(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id))
