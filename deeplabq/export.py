"""TFLite export: every deployable variant of a model, validated against its Keras source before it is kept.

Variants (TF Model Garden's ``quant_type`` names in brackets):
- ``float``          float32 weights and activations                                   [default]
- ``dynamic_range``  int8 weights, float activations quantized on the fly (TFLite PTQ tutorial)
- ``float16``        float16 weights                                                    [fp16]
- ``int8``           full-integer post-training quantization, calibrated on train images [int8_full]
- ``int16x8``        int16 activations, int8 weights (TFLite's 16x8 PTQ), calibrated like int8; float32 in and
                     out; no XNNPACK kernel runs it, so it is timed on TFLite's own kernels
- ``qat_int8``       full-integer conversion of a quantization-aware-trained model      [qat]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter

from deeplabq import quantization
from deeplabq.config import ExportSpec
from deeplabq.console import CapturedOutput, native_output
from deeplabq.errors import UserError
from deeplabq.evaluation import TFLiteSegmenter
from deeplabq.quantization import op_histogram, xnnpack_partitions  # noqa: F401  (re-exported)
from deeplabq.quantization.equalization import corrected_for_ptq

VARIANTS = ("float", "dynamic_range", "float16", "int8", "int16x8", "qat_int8")
CALIBRATED = ("int8", "int16x8")  # the variants converted with representative (calibration) images


class ExportError(UserError, RuntimeError):
    """A variant that could not be converted or did not validate; names the variant and the reason."""


@dataclass(frozen=True)
class ExportPlan:
    """What a run exports and ships, as its quant mode declares it (deeplabq.quant_modes)."""

    variants: tuple[str, ...]  # the TFLite files, in export order
    shipped: str  # the one whose metrics are also logged as deploy/*
    float_reference: str | None = None  # the metric deploy/delta_miou is measured against
    qat: bool = False  # the trained model is fake-quantized: qat_int8 converts it, the others its float source


@dataclass
class ExportedModel:
    variant: str
    path: Path
    size_bytes: int
    agreement: float  # fraction of pixels whose label equals the Keras model's argmax
    op_histogram: dict[str, int] = field(default_factory=dict)
    xnnpack_partitions: int = 0


def to_tflite(model: keras.Model, variant: str, *, output: str = "labels", input_type: str = "uint8",
              per_channel: bool = True, representative_images=None, float_layers=(), fold_input: bool = True,
              float_tail: bool = True, float16_arithmetic: bool = False, equalize: bool = False,
              bias_correction: bool = False) -> bytes:
    """Convert ``model`` to one TFLite variant and return the flatbuffer.

    ``input_type`` applies to the integer variants (uint8: raw pixels with scale 1 since the model
    normalizes internally; int8; float32). Float variants always take float32 0..255 pixels.
    ``representative_images`` (iterable of HxWx3 float 0..255 arrays) is required for ``int8``;
    ``float_layers`` (Keras layer names) stay float in the ``int8`` file. ``fold_input`` and ``float_tail``
    rewrite the integer files' graph (``deeplabq.quantization.deploy_graph``: the input normalization folded
    into the uint8 input, resize and ArgMax in float). ``float16_arithmetic`` marks the ``float16`` file
    ``reduced_precision_support: fp16accfp16``: XNNPACK then computes in fp16 on CPUs with fp16 arithmetic
    (ARMv8.2+), instead of dequantizing the weights to fp32 at load. ``equalize`` / ``bias_correction``: the
    calibrated variants convert a copy of ``model`` with cross-layer equalization / empirical bias
    correction (``deeplabq.quantization.equalization``) on the representative images.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}; choose from {VARIANTS}")
    if variant in CALIBRATED and representative_images is not None and (equalize or bias_correction):
        model = corrected_model(model, representative_images, equalize=equalize, bias_correction=bias_correction,
                                per_channel=per_channel, float_layers=float_layers if variant == "int8" else ())
    if variant == "int8":
        if representative_images is None:
            raise ValueError("int8 post-training quantization needs representative_images")
        tflite = quantization.ptq_int8_tflite(model, representative_images, per_channel=per_channel,
                                              input_type=input_type, output=output, float_layers=float_layers)
        return quantization.optimize_int8(tflite, fold_input=fold_input, tail_in_float=float_tail)[0]
    if variant == "int16x8":
        if representative_images is None:
            raise ValueError("16x8 post-training quantization needs representative_images")
        return quantization.ptq_int16x8_tflite(model, representative_images, per_channel=per_channel, output=output)
    if variant == "qat_int8":
        tflite = quantization.qat_to_tflite(model, input_type=input_type, output=output)
        return quantization.optimize_int8(tflite, fold_input=fold_input, tail_in_float=float_tail)[0]
    converter = quantization.tflite_converter(model, output)
    if variant == "dynamic_range":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
        if float16_arithmetic:
            converter.target_spec._experimental_supported_accumulation_type = tf.float16
    return converter.convert()


def corrected_model(model: keras.Model, images, *, equalize: bool, bias_correction: bool,
                    per_channel: bool, float_layers=()) -> keras.Model:
    """``model`` with the PTQ corrections asked for (none for ``float_layers``); bias correction measures on at
    most 64 of the images."""
    return corrected_for_ptq(model, list(images)[:64], equalize=equalize, bias_correction=bias_correction,
                             per_channel=per_channel, float_layers=tuple(float_layers))


def pixel_agreement(tflite: bytes, model: keras.Model, images) -> float:
    """Fraction of pixels where the TFLite labels equal the Keras model's argmax."""
    segmenter = TFLiteSegmenter(tflite)
    agree = total = 0
    for image in images:
        expected = np.argmax(model(image[None].astype(np.float32), training=False).numpy()[0], axis=-1)
        predicted = segmenter.predict(image)
        agree += int(np.sum(predicted == expected))
        total += expected.size
    return agree / max(total, 1)


def write_atomically(path: Path, content: bytes) -> None:
    """Write next to ``path`` and rename, so a crash never leaves a complete-looking partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def conversion_failure(variant: str, error: BaseException, converter_tail: str = "", stage: str = "") -> ExportError:
    """The ExportError of a variant whose conversion (or ``stage`` of it) raised ``error``; the converter's last
    lines are quoted when there are any."""
    said = f" (converter: {converter_tail})" if converter_tail else ""
    return ExportError(f"TFLite variant '{variant}' failed: {stage}{type(error).__name__}: {error}{said}")


def int8_layer_report(export_cfg: ExportSpec, float_model: keras.Model, representative_images) -> list[dict]:
    """The PTQ int8 per-layer error report (QuantizationDebugger) on the first ``export.int8_debug_images``
    calibration images, worst first."""
    float_model = corrected_model(float_model, representative_images, equalize=export_cfg.equalize,
                                  bias_correction=export_cfg.correct_bias, per_channel=export_cfg.per_channel)
    return quantization.int8_layer_errors(float_model, representative_images,
                                          representative_images[: int(export_cfg.int8_debug_images)],
                                          per_channel=bool(export_cfg.per_channel))


def int8_float_layers_of(export_cfg: ExportSpec, report: list[dict] | None) -> list[str]:
    """The layers the int8 file keeps in float: ``export.int8_float_layers`` plus the
    ``export.int8_float_worst_layers`` worst others of the per-layer ``report`` (None: no report)."""
    chosen = list(export_cfg.int8_float_layers)
    if report is not None:
        worst = [row["layer"] for row in report if row["layer"] not in chosen]
        chosen += list(dict.fromkeys(worst))[: int(export_cfg.int8_float_worst_layers)]
    return chosen


_NODE_FAILED = re.compile(r"Node number (\d+) \((\w+)\) failed to (prepare|invoke)")
_NO_KERNEL = re.compile(r"Didn't find op for builtin opcode '(\w+)'")


def litert_op_failure(tflite: bytes, error: BaseException) -> str:
    """The op LiteRT could not run, named in words, when ``error`` (LiteRT's) names one; else ''."""
    text = str(error)
    if match := _NO_KERNEL.search(text):
        return f"LiteRT has no kernel for op {match.group(1)} of this file: "
    if match := _NODE_FAILED.search(text):
        node, op, stage = int(match.group(1)), match.group(2), match.group(3)
        layer = ""
        try:
            with native_output():
                interpreter = Interpreter(model_content=tflite)
            names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
            outputs = interpreter._get_ops_details()[node]["outputs"]
            layer = f" (layer {quantization.layer_of_tensor(names[int(outputs[0])])})" if len(outputs) else ""
        except Exception:  # noqa: BLE001  (the op's name is enough)
            pass
        return f"LiteRT cannot {stage} op {op}{layer}, node {node} of this file: "
    return ""


def validate_and_write(tflite: bytes, model: keras.Model, variant: str, path: Path, *, check_images,
                       min_agreement: float = 0.0) -> ExportedModel:
    """Load and run a converted ``variant`` against its Keras ``model``, then write it. Raises ExportError, which
    names the op when LiteRT cannot run one (e.g. one with no kernel for the variant's types)."""
    native = CapturedOutput()
    try:
        with native_output(native):  # LiteRT's own lines: kept off the console, quoted on failure
            agreement = pixel_agreement(tflite, model, check_images)
    except Exception as error:  # noqa: BLE001  (any runtime failure is reported per variant)
        raise conversion_failure(variant, error, native.tail(3), stage=litert_op_failure(tflite, error)) from error
    if agreement < min_agreement:
        raise ExportError(f"TFLite variant '{variant}' agrees with its Keras model on only {agreement:.1%} "
                          f"of pixels (< {min_agreement:.0%}): the file is broken, not kept")
    write_atomically(path, tflite)
    return ExportedModel(variant, path, len(tflite), agreement, op_histogram(tflite), xnnpack_partitions(tflite))


def export_variant(model: keras.Model, variant: str, path: Path, *, check_images, export_cfg: ExportSpec,
                   representative_images=None, min_agreement: float = 0.0, float_layers=()) -> ExportedModel:
    """Convert (in this process), load, run and compare one variant, then write it. Raises ExportError naming
    the variant. ``deeplabq.conversion_process`` converts in a child process instead."""
    native = CapturedOutput()
    try:
        with native_output(native):  # the converter's own lines: kept off the console, quoted on failure
            tflite = to_tflite(model, variant, output=export_cfg.output, input_type=export_cfg.input_type,
                               per_channel=export_cfg.per_channel, representative_images=representative_images,
                               float_layers=float_layers, fold_input=export_cfg.int8_fold_input,
                               float_tail=export_cfg.int8_float_tail,
                               float16_arithmetic=export_cfg.float16_arithmetic, equalize=export_cfg.equalize,
                               bias_correction=export_cfg.correct_bias)
    except Exception as error:  # noqa: BLE001  (any converter failure is reported per variant)
        raise conversion_failure(variant, error, native.tail(3)) from error
    return validate_and_write(tflite, model, variant, path, check_images=check_images, min_agreement=min_agreement)
