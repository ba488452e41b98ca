"""TFLite conversion in a child process, so that a converter which aborts in native code (seen: MLIR's
``error: scale out of expressed type range`` then ``free(): double free detected``, SIGABRT) fails the variant
it was converting, not the run.

The parent (:func:`convert_in_child`) writes the job to a temporary folder: the DeepLabSpec and export options
(``job.json``), the weights of each Keras source (``float.npz``, ``qat.npz``: ``get_weights()`` order) with its
logits on one fixed image (``<kind>.expected.npy``), and the calibration images (``representative.npy``). One
fresh interpreter (``python -m deeplabq.conversion_process <folder> <variant>...``; never a fork of a process
whose TensorFlow threads run) rebuilds each model (``build_deeplab`` [+ ``quantize_model``]), checks its logits
against the parent's, and converts the variants one after another. Per variant it writes ``<variant>.tflite``
(atomically), then the done-marker ``<variant>.json`` (``{"error": null | message}``); the int8 per-layer error
report, when asked for, goes to ``int8.layer_errors.json`` before the int8 conversion starts.

The child's stdout and stderr go to ``child<n>.log`` (off the console); it prints ``MARK <variant>`` before
each variant, so the lines of a variant are known. A child that dies leaves the variant it was converting
without a marker: that variant fails with the signal or exit status and the last lines it printed, and a new
child converts the variants after it. Validation against the Keras model stays in the parent.

Test hook: with ``DEEPLABQ_TEST_ABORT_CONVERSION=<variant>`` in its environment, the child prints an error
line and calls ``os.abort()`` when it reaches that variant (what a native converter crash looks like).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MARK = "deeplabq.conversion_process: converting "
ABORT_HOOK = "DEEPLABQ_TEST_ABORT_CONVERSION"
LAYER_ERRORS = "int8.layer_errors.json"
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the child imports this same copy of deeplabq


@dataclass
class ChildConversion:
    """What the child made of one variant: its flatbuffer, or the ExportError message that fails it."""

    variant: str
    tflite: bytes | None = None
    error: str | None = None
    layer_errors: list[dict] | None = None  # the int8 per-layer error report, when it ran


def source_kind(variant: str) -> str:
    """Which Keras model a variant converts: the QAT model for ``qat_int8``, the float model otherwise."""
    return "qat" if variant == "qat_int8" else "float"


def check_image(model) -> np.ndarray:
    """A fixed 0..255 image of the model's input size, on which parent and child compare logits."""
    return np.random.default_rng(0).uniform(0, 255, model.input_shape[1:]).astype(np.float32)


def write_job(folder: Path, model_spec, models: dict, variants: list[str], export_spec,
              representative_images=None) -> None:
    """Everything the child needs, as files in ``folder``. ``models``: kind ("float"/"qat") -> Keras model."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, model in models.items():
        np.savez(folder / f"{kind}.npz", *model.get_weights())
        image = check_image(model)
        np.save(folder / f"{kind}.check.npy", image)
        np.save(folder / f"{kind}.expected.npy", model(image[None], training=False).numpy())
    if representative_images is not None:
        np.save(folder / "representative.npy", np.stack([np.asarray(i, np.float32) for i in representative_images]))
    job = {"model": asdict(model_spec), "export": asdict(export_spec),
           "variants": {variant: source_kind(variant) for variant in variants}}
    (folder / "job.json").write_text(json.dumps(job, indent=1))


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    if returncode > 0:
        return f"exited with status {returncode}"
    return "exited"


def _segments(log: str) -> tuple[str, dict[str, str]]:
    """The log's lines before the first variant, and each variant's lines."""
    head, parts, current = [], {}, None
    for line in log.splitlines():
        if MARK in line:  # not always at the line's start: native code may leave a line unfinished
            before, _, variant = line.partition(MARK)
            (head if current is None else parts[current]).append(before)
            current = variant.strip()
            parts[current] = []
        elif current is None:
            head.append(line)
        else:
            parts[current].append(line)
    return "\n".join(head), {variant: "\n".join(lines) for variant, lines in parts.items()}


def _tail(text: str, lines: int = 3) -> str:
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def _quoted(text: str) -> str:
    tail = _tail(text)
    return f" (converter: {tail})" if tail else ""


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _run_child(folder: Path, variants: list[str], log: Path) -> int:
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(_PACKAGE_ROOT), *([path] if path else [])])}
    with open(log, "wb") as out:
        return subprocess.run([sys.executable, "-m", "deeplabq.conversion_process", str(folder), *variants],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                              check=False).returncode


def convert_in_child(model_spec, models: dict, variants: list[str], export_spec, representative_images=None,
                     *, verbose: bool | None = None) -> dict[str, ChildConversion]:
    """Convert ``variants`` in one child process (a new one after each crash); variant -> its result.

    ``models``: kind ("float"/"qat", see :func:`source_kind`) -> the Keras model, built as
    ``build_deeplab(model_spec)`` [+ ``quantize_model``]. ``verbose``: copy the child's output to stderr
    (default: ``DEEPLABQ_VERBOSE``)."""
    verbose = os.environ.get("DEEPLABQ_VERBOSE") == "1" if verbose is None else verbose
    results: dict[str, ChildConversion] = {}
    with tempfile.TemporaryDirectory(prefix="deeplabq-convert-") as tmp:
        folder = Path(tmp)
        write_job(folder, model_spec, models, variants, export_spec, representative_images)
        remaining, attempt = list(variants), 0
        while remaining:
            log = folder / f"child{attempt}.log"
            returncode = _run_child(folder, remaining, log)
            text = log.read_text(errors="replace")
            if verbose:
                sys.stderr.write(text)
            head, segments = _segments(text)
            while remaining and (folder / f"{remaining[0]}.json").is_file():
                variant = remaining.pop(0)
                error = _read_json(folder / f"{variant}.json")["error"]
                tflite = folder / f"{variant}.tflite"
                results[variant] = ChildConversion(
                    variant, tflite=None if error else tflite.read_bytes(),
                    error=error and error + _quoted(segments.get(variant, "")),
                    layer_errors=_read_json(folder / LAYER_ERRORS) if variant == "int8" else None)
            if not remaining:
                break
            variant = remaining.pop(0)
            how = f"the conversion process {_how_it_ended(returncode)}"
            if variant not in segments:  # died before it reached a variant: the others would fare no better
                for other in [variant, *remaining]:
                    results[other] = ChildConversion(other, error=f"TFLite variant '{other}' failed: {how} "
                                                                  f"before converting it{_quoted(head)}")
                break
            results[variant] = ChildConversion(
                variant, error=f"TFLite variant '{variant}' failed: {how} while converting it"
                               f"{_quoted(segments[variant])}",
                layer_errors=_read_json(folder / LAYER_ERRORS) if variant == "int8" else None)
            attempt += 1
    return results


# --------------------------------------------------------------------------------------------------------
# The child.


def rebuild_model(folder: Path, kind: str, model_spec):
    """The ``kind`` model of the job in ``folder``: built from ``model_spec``, its weights loaded, its logits
    checked against the parent's on the same image."""
    from deeplabq.model import build_deeplab
    from deeplabq.quantization import quantize_model

    model = build_deeplab(model_spec)
    if kind == "qat":
        model = quantize_model(model)
    with np.load(folder / f"{kind}.npz") as weights:
        model.set_weights([weights[f"arr_{i}"] for i in range(len(weights.files))])
    expected = np.load(folder / f"{kind}.expected.npy")
    got = model(np.load(folder / f"{kind}.check.npy")[None], training=False).numpy()
    difference = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if not difference <= 1e-4 * max(1.0, float(np.max(np.abs(expected)))):
        raise ValueError(f"the {kind} model rebuilt from its DeepLabSpec and weights differs from the one given "
                         f"(max |logit difference| {difference:.3g})")
    return model


def _spec(cls, values: dict):
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder, variants = Path(args[0]), args[1:]
    from deeplabq.console import quiet_console

    quiet_console(os.environ.get("DEEPLABQ_VERBOSE") == "1")
    from deeplabq import export
    from deeplabq.config import ExportSpec
    from deeplabq.model import DeepLabSpec

    job = json.loads((folder / "job.json").read_text())
    model_spec, export_spec = _spec(DeepLabSpec, job["model"]), _spec(ExportSpec, job["export"])
    representative = np.load(folder / "representative.npy") if (folder / "representative.npy").is_file() else None
    models = {}
    for variant in variants:
        print(MARK + variant, file=sys.stderr, flush=True)
        if os.environ.get(ABORT_HOOK) == variant:
            print(f"error: {ABORT_HOOK}={variant}: aborting (test hook)", file=sys.stderr, flush=True)
            os.abort()
        error = None
        try:
            kind = job["variants"][variant]
            if kind not in models:
                models[kind] = rebuild_model(folder, kind, model_spec)
            model = models[kind]
        except Exception as failure:  # noqa: BLE001  (reported as the variant's failure)
            error = str(export.conversion_failure(variant, failure, stage="rebuilding its Keras model: "))
        report = None
        if error is None and variant == "int8" and int(export_spec.int8_debug_images) > 0:
            try:
                report = export.int8_layer_report(export_spec, model, representative)
            except Exception as failure:  # noqa: BLE001
                error = str(export.conversion_failure(variant, failure, stage="per-layer error report: "))
            else:
                export.write_atomically(folder / LAYER_ERRORS, json.dumps(report).encode())
        if error is None:
            try:
                tflite = export.to_tflite(
                    model, variant, output=export_spec.output, input_type=export_spec.input_type,
                    per_channel=export_spec.per_channel, representative_images=representative,
                    float_layers=export.int8_float_layers_of(export_spec, report) if variant == "int8" else (),
                    fold_input=export_spec.int8_fold_input, float_tail=export_spec.int8_float_tail,
                    float16_arithmetic=export_spec.float16_arithmetic)
            except Exception as failure:  # noqa: BLE001  (any converter failure is reported per variant)
                error = str(export.conversion_failure(variant, failure))
            else:
                export.write_atomically(folder / f"{variant}.tflite", tflite)
        export.write_atomically(folder / f"{variant}.json", json.dumps({"error": error}).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
