"""TFLite export: every deployable variant of a model, validated against its Keras source before it is kept.

Variants (TF Model Garden's ``quant_type`` names in brackets):
- ``float``          float32 weights and activations                                   [default]
- ``dynamic_range``  int8 weights, float activations quantized on the fly (TFLite PTQ tutorial)
- ``float16``        float16 weights                                                    [fp16]
- ``int8``           full-integer post-training quantization, calibrated on train images [int8_full]
- ``qat_int8``       full-integer conversion of a quantization-aware-trained model      [qat]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from deeplabq import quantization
from deeplabq.console import CapturedOutput, native_output
from deeplabq.evaluation import TFLiteSegmenter
from deeplabq.quantization import op_histogram, xnnpack_partitions  # noqa: F401  (re-exported)

VARIANTS = ("float", "dynamic_range", "float16", "int8", "qat_int8")


class ExportError(RuntimeError):
    """A variant that could not be converted or did not validate; names the variant and the reason."""


@dataclass
class ExportedModel:
    variant: str
    path: Path
    size_bytes: int
    agreement: float  # fraction of pixels whose label equals the Keras model's argmax
    op_histogram: dict[str, int] = field(default_factory=dict)
    xnnpack_partitions: int = 0


def to_tflite(model: keras.Model, variant: str, *, output: str = "labels", input_type: str = "uint8",
              per_channel: bool = True, representative_images=None, float_layers=()) -> bytes:
    """Convert ``model`` to one TFLite variant and return the flatbuffer.

    ``input_type`` applies to the integer variants (uint8: raw pixels with scale 1 since the model
    normalizes internally; int8; float32). Float variants always take float32 0..255 pixels.
    ``representative_images`` (iterable of HxWx3 float 0..255 arrays) is required for ``int8``;
    ``float_layers`` (Keras layer names) stay float in the ``int8`` file.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}; choose from {VARIANTS}")
    if variant == "int8":
        if representative_images is None:
            raise ValueError("int8 post-training quantization needs representative_images")
        return quantization.ptq_int8_tflite(model, representative_images, per_channel=per_channel,
                                            input_type=input_type, output=output, float_layers=float_layers)
    if variant == "qat_int8":
        return quantization.qat_to_tflite(model, input_type=input_type, output=output)
    converter = quantization.tflite_converter(model, output)
    if variant == "dynamic_range":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


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


def export_variant(model: keras.Model, variant: str, path: Path, *, check_images, export_cfg,
                   representative_images=None, min_agreement: float = 0.0, float_layers=()) -> ExportedModel:
    """Convert, load, run and compare one variant, then write it. Raises ExportError naming the variant."""
    native = CapturedOutput()
    try:
        with native_output(native):  # the converter's own lines: kept off the console, quoted on failure
            tflite = to_tflite(model, variant, output=export_cfg.output, input_type=export_cfg.input_type,
                               per_channel=export_cfg.per_channel, representative_images=representative_images,
                               float_layers=float_layers)
            agreement = pixel_agreement(tflite, model, check_images)
    except Exception as error:  # noqa: BLE001  (any converter/runtime failure is reported per variant)
        said = f" (converter: {native.tail(3)})" if native.tail(3) else ""
        raise ExportError(f"TFLite variant '{variant}' failed: {type(error).__name__}: {error}{said}") from error
    if agreement < min_agreement:
        raise ExportError(f"TFLite variant '{variant}' agrees with its Keras model on only {agreement:.1%} "
                          f"of pixels (< {min_agreement:.0%})")
    write_atomically(path, tflite)
    return ExportedModel(variant, path, len(tflite), agreement, op_histogram(tflite), xnnpack_partitions(tflite))


def convert(cfg, output_dir) -> dict[str, float]:
    """convert.py: a checkpoint, run dir or MLflow run → the requested TFLite variants, measured and logged.

    The conversion is a run of its own, a child of the source's run when it has one, named by its options:
    it never overwrites what the source run recorded. The last of ``variants`` is its ``deploy/*`` artifact.
    """
    import mlflow

    from deeplabq import data as data_lib
    from deeplabq import reporting, sources, tracking

    output_dir = Path(output_dir)
    tracking.setup_mlflow(cfg.tracking)  # a run id source is looked up in the configured store
    source = sources.resolve_source(cfg.source)
    if source.kind != "checkpoint":
        raise ValueError(f"convert.py needs a checkpoint, run dir or run id, got {source.describe()}")
    for variant in cfg.variants:
        if variant not in VARIANTS:
            raise ValueError(f"variants: unknown TFLite variant {variant!r}; choose from {VARIANTS}")
        if (variant == "qat_int8") != source.quantized:
            raise ValueError(f"variants: {variant!r} does not fit {source.describe()} "
                             f"({'a QAT' if source.quantized else 'a float'} checkpoint)")
    overrides = tracking.command_line_overrides()
    if cfg.use_run_config:
        cfg = sources.with_run_architecture(cfg, source, overrides)
    options = [o for o in overrides if o.startswith(("variants=", "export."))]
    cfg = tracking.with_run_name(cfg, "convert " + (" ".join(options) or ",".join(cfg.variants)))
    with tracking.tracked_run(cfg, output_dir, parent_run_id=source.run_id):
        mlflow.set_tag("deeplabq.converted_from", source.describe())
        model = sources.load_keras_model(cfg, source)
        train_split = data_lib.open_split(cfg.dataset, cfg.dataset.train_split)
        eval_split = data_lib.open_split(cfg.dataset, cfg.eval.split)
        models = {"qat_model": model} if source.quantized else {"float_model": model}
        metrics = reporting.export_and_measure(cfg, output_dir, list(cfg.variants), train_split=train_split,
                                               eval_split=eval_split, **models)
        metrics.update(reporting.ship(metrics, str(cfg.variants[-1]), "float/miou"))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        print(reporting.summary_table(metrics, [int(t) for t in cfg.eval.latency_threads]))
        reporting.print_run_location(cfg)
        return metrics
