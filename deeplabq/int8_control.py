"""``export.int8_max_drop``: the PTQ int8 file keeps the fewest of its worst layers in float that bring its mIoU
within the budget of the float file's (deeplabq.quantization.accuracy_control searches; this module measures).

Every candidate is converted in this process (from the float model with the run's corrections), scored with
LiteRT on the first ``export.int8_control_images`` images of the eval split, timed at 1 thread interleaved with
the float file (median of ``eval.latency_runs``, at least 30), and its XNNPACK partitions counted: float islands
cost DEQUANTIZE/QUANTIZE pairs and can split the graph. The curve is written and logged as
``tflite/int8_accuracy_control.csv`` and ``figures/int8_accuracy_control.png``, and as MLflow metrics
``int8_control/*`` with the number of float layers as their step. The chosen layers then go to the ordinary int8
export as ``export.int8_float_layers``. A budget the cap cannot meet fails the int8 variant, naming the best
point reached.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import mlflow

from deeplabq import data as data_lib
from deeplabq import evaluation, export, figures, quantization, tracking
from deeplabq.config import RunSpec
from deeplabq.console import native_output, progress
from deeplabq.quantization.accuracy_control import Measured, SearchResult, search

CURVE_FILE = "int8_accuracy_control.csv"
FIGURE_FILE = "int8_accuracy_control.png"


def _subset(spec: RunSpec, eval_split) -> list[tuple]:
    count = len(eval_split) if spec.export.int8_control_images is None else min(int(spec.export.int8_control_images),
                                                                                len(eval_split))
    pairs = []
    for index in range(count):
        image, label = eval_split.load(index)
        padded, padded_label, _ = data_lib.preprocess_for_eval(image, label, spec.dataset)
        pairs.append((padded, padded_label))
    return pairs


def _miou(tflite: bytes, pairs: list[tuple], eval_split) -> float:
    segmenter = evaluation.TFLiteSegmenter(tflite, name="candidate")
    confusion = evaluation.ConfusionMatrix(eval_split.num_classes, eval_split.ignore_label)
    for image, label in pairs:
        confusion.update(label, segmenter.predict(image))
    return 100 * confusion.miou()


def run_search(spec: RunSpec, float_model, representative, eval_split) -> SearchResult:
    """The accuracy-controlled search on ``float_model`` (module docstring)."""
    cfg = spec.export
    pairs = _subset(spec, eval_split)
    with native_output():
        equalized = export.corrected_model(float_model, representative, equalize=cfg.equalize, bias_correction=False,
                                           per_channel=cfg.per_channel)
        model = export.corrected_model(equalized, representative, equalize=False, bias_correction=cfg.correct_bias,
                                       per_channel=cfg.per_channel)
        report = quantization.int8_layer_errors(model, representative, representative[: int(cfg.int8_debug_images)],
                                                per_channel=cfg.per_channel)
        float_file = export.to_tflite(float_model, "float", output=cfg.output)
    baseline = _miou(float_file, pairs, eval_split)
    runs = max(30, int(spec.eval.latency_runs))
    bar = progress(total=None, desc="int8 accuracy control", unit="file")

    def measure(layers: tuple[str, ...]) -> Measured:
        with native_output():  # bias correction again: the layers kept float must not carry an int8 correction
            candidate = model if not (cfg.correct_bias and layers) else export.corrected_model(
                equalized, representative, equalize=False, bias_correction=True, per_channel=cfg.per_channel,
                float_layers=layers)
            tflite = quantization.optimize_int8(
                quantization.ptq_int8_tflite(candidate, representative, per_channel=cfg.per_channel,
                                             input_type=cfg.input_type, output=cfg.output, float_layers=layers),
                fold_input=cfg.int8_fold_input, tail_in_float=cfg.int8_float_tail)[0]
            latency = evaluation.interleaved_latency({"float": float_file, "int8": tflite}, 1, runs=runs)
        bar.update(1)
        return Measured(miou=_miou(tflite, pairs, eval_split), latency_ms=latency["int8"],
                        xnnpack_partitions=quantization.xnnpack_partitions(tflite), size_bytes=len(tflite),
                        float_latency_ms=latency["float"])

    try:
        return search([row["layer"] for row in report], measure, baseline=baseline, max_drop=float(cfg.int8_max_drop),
                      cap=int(cfg.int8_max_float_layers))
    finally:
        bar.close()


def log_curve(result: SearchResult, output_dir: Path, images: int) -> None:
    """The curve as CSV, figure and step metrics of the active run; one printed line per point."""
    rows = [step.row() for step in result.curve()]
    table = io.StringIO()
    writer = csv.DictWriter(table, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    csv_path = output_dir / "tflite" / CURVE_FILE
    export.write_atomically(csv_path, table.getvalue().encode())
    tracking.log_artifact(csv_path, artifact_path="tflite")
    figure = figures.accuracy_control_figure(rows, result.baseline, result.max_drop,
                                             output_dir / "figures" / FIGURE_FILE,
                                             title=f"int8 accuracy control: first {images} eval images")
    tracking.log_artifact(figure, artifact_path="figures")
    for row in rows:
        tracking.log_metrics({f"int8_control/{key}": row[key] for key in
                              ("miou", "drop", "latency_ms", "float_latency_ms", "xnnpack_partitions", "size_bytes")},
                             step=row["float_layers"])
    print(f"int8 accuracy control (budget {result.max_drop} mIoU points below float {result.baseline:.2f}, "
          f"first {images} eval images): " + "; ".join(
              f"{r['float_layers']} float: {r['miou']:.2f} ({-r['drop']:+.2f}), {r['latency_ms']:.2f} ms, "
              f"{r['xnnpack_partitions']} partitions" for r in rows))


def with_controlled_float_layers(spec: RunSpec, output_dir: Path, float_model, representative,
                                 eval_split) -> RunSpec:
    """``spec`` whose ``export.int8_float_layers`` are the search's choice (and no worst-N on top). Raises
    ExportError (the int8 variant's) when the budget cannot be met within ``export.int8_max_float_layers``."""
    result = run_search(spec, float_model, representative, eval_split)
    images = len(_subset(spec, eval_split)) if spec.export.int8_control_images is None else min(
        int(spec.export.int8_control_images), len(eval_split))
    log_curve(result, output_dir, images)
    if not result.met:
        best = result.best()
        raise export.ExportError(
            f"TFLite variant 'int8' failed: export.int8_max_drop={result.max_drop} cannot be met: with up to "
            f"export.int8_max_float_layers={result.cap} of its worst layers in float, the best drop is "
            f"{best.drop:.2f} mIoU points ({best.float_layers} float, mIoU {best.measured.miou:.2f} against float "
            f"{result.baseline:.2f} on the first {images} eval images); the curve is tflite/{CURVE_FILE}")
    chosen = result.chosen
    mlflow.set_tags({"deeplabq.int8_control": f"{chosen.float_layers} float layers, drop {chosen.drop:.2f} "
                                              f"(budget {result.max_drop}, {len(result.steps)} conversions)"})
    export_spec = dataclasses.replace(spec.export, int8_float_layers=chosen.layers, int8_float_worst_layers=0)
    return dataclasses.replace(spec, export=export_spec)
