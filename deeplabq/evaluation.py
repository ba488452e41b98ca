"""Segmentation metrics and evaluation of Keras models and TFLite files on a dataset split."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from deeplabq import data as data_lib
from deeplabq.config import EvalSpec
from deeplabq.console import native_output, progress
from deeplabq.errors import UserError
from deeplabq.quantization.inspection import read_metadata


@dataclass
class ConfusionMatrix:
    """Pixel confusion matrix; pixels labelled ``ignore_label`` do not count."""

    num_classes: int
    ignore_label: int
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        labels = np.asarray(labels).reshape(-1).astype(np.int64)
        predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
        valid = labels != self.ignore_label
        index = labels[valid] * self.num_classes + np.clip(predictions[valid], 0, self.num_classes - 1)
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(self.matrix.shape)

    def per_class_iou(self) -> np.ndarray:
        """IoU of each class; NaN where the class appears in neither labels nor predictions."""
        true_positive = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - true_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, true_positive / union, np.nan)
        if 0 <= self.ignore_label < self.num_classes:
            iou[self.ignore_label] = np.nan  # e.g. ADE20K's class 0: never a target
        return iou

    def miou(self) -> float:
        iou = self.per_class_iou()
        return float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else 0.0

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else 0.0

    def metrics(self, class_names: list[str], prefix: str = "") -> dict[str, float]:
        """Flat metric dict in percent (the one unit of mIoU in deeplabq: MLflow, summaries, README):
        miou, pixel_accuracy and iou/<class> (classes never seen are left out)."""
        out = {f"{prefix}miou": 100 * self.miou(), f"{prefix}pixel_accuracy": 100 * self.pixel_accuracy()}
        for name, value in zip(class_names, self.per_class_iou(), strict=False):
            if not np.isnan(value):
                out[f"{prefix}iou/{name}"] = 100 * float(value)
        return out


def evaluate_keras(model, split: data_lib.SegmentationSplit, dataset_cfg, *, batch_size: int = 4,
                   max_images: int | None = None) -> ConfusionMatrix:
    """Single-scale padded evaluation of a Keras model (padding is labelled ignore, so it never counts)."""
    confusion = ConfusionMatrix(split.num_classes, split.ignore_label)
    pipeline = data_lib.input_pipeline(split, dataset_cfg, training=False, batch_size=batch_size)
    total = len(split) if max_images is None else min(max_images, len(split))
    seen = 0
    with progress(total=total, desc=f"eval keras {split.split}") as bar:
        for images, labels in data_lib.iterate(pipeline):
            if seen >= total:
                break
            take = min(total - seen, int(images.shape[0]))
            logits = model(images[:take], training=False)
            confusion.update(labels[:take].numpy(), np.argmax(logits.numpy(), axis=-1))
            seen += take
            bar.update(take)
    return confusion


class TFLiteError(UserError, ValueError):
    """A file that LiteRT cannot load or run (not a TFLite flatbuffer, truncated, wrong input)."""


def load_interpreter(source: dict, num_threads: int):
    """A LiteRT interpreter with its tensors allocated (``source``: model_path= or model_content=); its
    one-time "Created XNNPACK delegate" line stays off the console."""
    with native_output():
        interpreter = Interpreter(**source, num_threads=num_threads)
        interpreter.allocate_tensors()
    return interpreter


def input_tensor(batch: np.ndarray, detail: dict, *, raw_pixels: bool) -> np.ndarray:
    """0..255 pixels as a file's input tensor (``detail``: its input details): float as they are, integer raw
    when the file says so (``raw_pixels``) or has no scale, else quantized with its scale and zero point."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return batch.astype(dtype)
    scale, zero_point = detail["quantization"]
    values = np.round(batch) if scale == 0 or raw_pixels else np.round(batch / scale + zero_point)
    return np.clip(values, np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)


class TFLiteSegmenter:
    """Runs a DeepLab TFLite file on images, whatever its I/O types.

    Inputs are raw 0..255 RGB pixels; they are fed as float32, as they are to a uint8 input whose file says
    so (``deeplabq`` metadata ``input: raw_pixels``: the input normalization is folded into its quantization),
    or else quantized with the input tensor's own scale and zero point. Outputs are either labels (ArgMax
    inside the graph) or logits (argmax taken here; dequantization is not needed for argmax).
    """

    def __init__(self, model: bytes | str, num_threads: int = 1, name: str | None = None) -> None:
        self.name = name or (model if isinstance(model, str) else "<tflite bytes>")
        source = {"model_path": model} if isinstance(model, str) else {"model_content": model}
        try:
            self.interpreter = load_interpreter(source, num_threads)
            with open(model, "rb") if isinstance(model, str) else nullcontext() as f:
                self.raw_pixels = read_metadata(f.read() if f else model).get("input") == "raw_pixels"
        except (ValueError, RuntimeError) as error:
            raise TFLiteError(f"{self.name} is not a loadable TFLite model: {error}") from error
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0]["shape"]) != 4:
            raise TFLiteError(f"{self.name}: expected one NHWC image input and one output, got "
                              f"{[list(d['shape']) for d in inputs]} -> {[list(d['shape']) for d in outputs]}")
        self.input, self.output = inputs[0], outputs[0]
        self.input_hw = tuple(int(s) for s in self.input["shape"][1:3])
        self.outputs_labels = len(self.output["shape"]) == 3  # ArgMax inside: (1, H, W) labels

    def _prepare(self, image: np.ndarray) -> np.ndarray:
        return input_tensor(np.asarray(image, dtype=np.float32)[None], self.input, raw_pixels=self.raw_pixels)

    def set_input(self, image: np.ndarray) -> None:
        if tuple(image.shape[:2]) != self.input_hw:
            raise TFLiteError(f"{self.name} takes {self.input_hw} images, got {tuple(image.shape[:2])}")
        self.interpreter.set_tensor(self.input["index"], self._prepare(image))

    def invoke(self) -> None:
        self.interpreter.invoke()

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Label map (H, W) of one padded image (float 0..255, the model's input size)."""
        self.set_input(image)
        self.invoke()
        out = self.interpreter.get_tensor(self.output["index"])[0]
        return out.astype(np.int64) if self.outputs_labels else np.argmax(out, axis=-1)


def evaluate_tflite(segmenter: TFLiteSegmenter, split: data_lib.SegmentationSplit, dataset_cfg, *,
                    max_images: int | None = None) -> ConfusionMatrix:
    """Single-scale padded evaluation of a TFLite file with LiteRT (numpy pre/post-processing)."""
    confusion = ConfusionMatrix(split.num_classes, split.ignore_label)
    total = len(split) if max_images is None else min(max_images, len(split))
    for index in progress(range(total), desc=f"eval {segmenter.name}"):
        image, label = split.load(index)
        padded_image, padded_label, _ = data_lib.preprocess_for_eval(image, label, dataset_cfg)
        confusion.update(padded_label, segmenter.predict(padded_image))
    return confusion


def measure_latency(segmenter: TFLiteSegmenter, *, warmup: int = 2, runs: int = 10) -> dict[str, float]:
    """Median and p90 wall time of invoke() in ms on a fixed mid-grey image."""
    segmenter.set_input(np.full((*segmenter.input_hw, 3), 127.0, dtype=np.float32))
    for _ in range(warmup):
        segmenter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        segmenter.invoke()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"latency_ms": float(np.median(times)), "latency_p90_ms": float(np.percentile(times, 90))}


def interleaved_latency(models: dict, num_threads: int, *, warmup: int = 3, runs: int = 30) -> dict[str, float]:
    """Median invoke time (ms) of each TFLite model (``{name: file path or flatbuffer bytes}``), invoked
    round-robin in one process (model 1, model 2, ..., model 1, ...), so that background load hits all of them
    alike and their ratios compare like with like. Inputs are fixed random values of each model's own input
    shape and type (latency does not depend on them)."""
    interpreters = {}
    for name, model in models.items():
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        interpreter = load_interpreter(source, num_threads)
        (inp,) = interpreter.get_input_details()
        values = np.random.default_rng(7).integers(0, 256, inp["shape"])
        interpreter.set_tensor(inp["index"], (values - 128 if inp["dtype"] == np.int8 else values).astype(inp["dtype"]))
        interpreters[name] = interpreter
    return interleaved_invoke_ms(interpreters, warmup=warmup, runs=runs)


def interleaved_invoke_ms(interpreters: dict, *, warmup: int, runs: int) -> dict:
    """Median invoke time (ms) of each interpreter (inputs already set), invoked round-robin in one process."""
    for interpreter in interpreters.values():
        for _ in range(warmup):
            interpreter.invoke()
    times = {name: [] for name in interpreters}
    for _ in range(runs):
        for name, interpreter in interpreters.items():
            start = time.perf_counter()
            interpreter.invoke()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: float(np.median(values)) for name, values in times.items()}


def tflite_metrics(path, kind: str, split: data_lib.SegmentationSplit, evaluation: EvalSpec,
                   dataset_cfg) -> tuple[dict[str, float], ConfusionMatrix]:
    """mIoU / per-class IoU / pixel accuracy of a TFLite file (with the most threads), and its latency per
    thread count in ``eval.latency_threads``, as ``<kind>/...`` metrics; and its confusion matrix."""
    threads = [int(t) for t in evaluation.latency_threads]
    segmenter = TFLiteSegmenter(str(path), num_threads=max(threads), name=f"{kind}.tflite")
    confusion = evaluate_tflite(segmenter, split, dataset_cfg, max_images=evaluation.max_images)
    metrics = confusion.metrics(list(split.class_names), prefix=f"{kind}/")
    for count in threads:
        latency = measure_latency(TFLiteSegmenter(str(path), num_threads=count),
                                  warmup=int(evaluation.latency_warmup), runs=int(evaluation.latency_runs))
        metrics[f"{kind}/latency_ms_t{count}"] = latency["latency_ms"]
        metrics[f"{kind}/latency_p90_ms_t{count}"] = latency["latency_p90_ms"]
    return metrics, confusion


def deploy_metrics(metrics: dict[str, float], artifact: str, reference: str | None = None) -> dict[str, float]:
    """The shipped artifact's metrics under one name in every mode (``deploy/miou``, ``deploy/size_bytes``,
    ``deploy/latency_ms_t<n>`` ...), and ``deploy/delta_miou`` against ``reference`` when the run has it."""
    out = {}
    for key, value in metrics.items():
        kind, _, name = key.partition("/")
        if kind == artifact and (name in DEPLOY_KEYS or name.startswith("latency_ms_t")):
            out[f"deploy/{name}"] = value
    if "deploy/miou" in out and reference in metrics:
        out["deploy/delta_miou"] = out["deploy/miou"] - metrics[reference]
    return out


DEPLOY_KEYS = ("miou", "pixel_accuracy", "size_bytes", "agreement", "xnnpack_partitions")


def artifacts_in(metrics: dict[str, float]) -> list[str]:
    """The TFLite artifacts a metrics dict has (``<artifact>/size_bytes``), in logging order; not ``deploy``,
    which repeats one of them."""
    return [k.split("/")[0] for k in metrics if k.endswith("/size_bytes") and not k.startswith("deploy/")]

