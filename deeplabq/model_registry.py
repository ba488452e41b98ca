"""A run's TFLite file as an MLflow model: a pyfunc segmenter (MLflow has no TFLite flavor), registered as a
version of a named model with the run's numbers as tags and an alias (``@mobile``), and found again by
``models:/<name>@<alias>``.

The pyfunc model holds the .tflite file and the run's dataset preprocessing as artifacts; ``predict`` takes
uint8 images ``(N, H, W, 3)`` and returns class ids ``(N, H, W)`` at the images' own size: resize to range
and pad with the mean pixel as the run evaluated, LiteRT, crop, resize back.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from omegaconf import OmegaConf

from deeplabq import tracking
from deeplabq.data import postprocess_labels, preprocess_for_eval
from deeplabq.errors import ConfigError, InputNotFoundError
from deeplabq.evaluation import TFLiteSegmenter

MODEL_NAME = "segmenter"  # the logged model's name inside its run
SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                           outputs=Schema([TensorSpec(np.dtype(np.int32), (-1, -1, -1))]))
PIP_REQUIREMENTS = ["ai-edge-litert", "numpy", "omegaconf", "tensorflow", "mlflow"]
# What a version's tags carry, from the run's metrics of the registered artifact.
VERSION_METRICS = ("miou", "size_bytes", "latency_ms_t1", "latency_ms_t2", "agreement")


# MLflow prints a warning at class definition that ``predict`` has no type hints (the explicit tensor
# SIGNATURE below is what validates inputs). Its own "once" filter outranks any filter set here, so its line
# is kept off the console of every command that imports this module by catching stderr for the definition.
with contextlib.redirect_stderr(io.StringIO()):
    class TFLiteSegmenterModel(mlflow.pyfunc.PythonModel):
        """LiteRT with the run's eval pre- and post-processing, behind ``mlflow.pyfunc``."""

        def load_context(self, context) -> None:
            self.dataset = OmegaConf.load(context.artifacts["preprocessing"])
            self.segmenter = TFLiteSegmenter(context.artifacts["tflite"])

        def predict(self, context, model_input, params=None) -> np.ndarray:
            """uint8 images (N, H, W, 3) → class ids (N, H, W)."""
            return np.stack([self.segment(image) for image in np.asarray(model_input)])

        def segment(self, image: np.ndarray) -> np.ndarray:
            padded, _, valid = preprocess_for_eval(image, None, self.dataset)
            return postprocess_labels(self.segmenter.predict(padded), valid, image.shape[:2]).astype(np.int32)


def register(run_id: str, name: str, alias: str | None = None, artifact: str | None = None) -> int:
    """Register ``artifact`` of ``run_id`` (default: the file the run ships) as a new version of ``name``,
    tagged with its numbers, and point ``alias`` at it. Logged from a child run of the source run, so the
    source run's own record is left as it was. Returns the version number."""
    source = _finished_run(run_id)
    artifact = artifact or source.data.tags.get("deeplabq.deploy_artifact")
    if not artifact:
        raise ConfigError(f"run {run_id} ships no TFLite file (no deeplabq.deploy_artifact tag): name one with "
                          f"--artifact")
    tflite = tracking.run_artifact_dir(run_id) / "tflite" / f"{artifact}.tflite"
    config = tracking.run_artifact_dir(run_id) / "config.yaml"
    if not tflite.is_file():
        raise InputNotFoundError(f"run {run_id} has no tflite/{artifact}.tflite")
    with tempfile.TemporaryDirectory() as tmp:
        preprocessing = Path(tmp) / "preprocessing.yaml"
        preprocessing.write_text(OmegaConf.to_yaml(OmegaConf.load(config).dataset, resolve=True))
        with mlflow.start_run(experiment_id=source.info.experiment_id, run_name=f"register {name} {artifact}",
                              tags={"mlflow.parentRunId": run_id, "deeplabq.task": "register"}):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=TFLiteSegmenterModel(), signature=SIGNATURE,
                artifacts={"tflite": str(tflite), "preprocessing": str(preprocessing)},
                pip_requirements=PIP_REQUIREMENTS, registered_model_name=name)
    version = int(info.registered_model_version)
    client = MlflowClient()
    for key, value in version_tags(source, artifact).items():
        client.set_model_version_tag(name, str(version), key, value)
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    return version


def version_tags(run, artifact: str) -> dict[str, str]:
    """The registered file's numbers (mIoU, size, latencies, agreement), how it was made and on which CPU."""
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    values = {key: metrics[f"{artifact}/{key}"] for key in VERSION_METRICS if f"{artifact}/{key}" in metrics}
    out = {key: str(int(v)) if key == "size_bytes" else f"{v:.4f}" for key, v in values.items()}
    out.update({"artifact": artifact, "source_run": run.info.run_id, "run_name": run.info.run_name,
                "quant_mode": params.get("quant.mode", "?"), "dataset": params.get("dataset.name", "?"),
                "cpu_features": tags.get("deeplabq.cpu_features", "unknown")})
    if "deeplabq.quant_delay" in tags:
        out["quant_delay"] = tags["deeplabq.quant_delay"]
    return out


def _finished_run(run_id: str):
    tracking.check_run_exists(run_id)
    run = MlflowClient().get_run(run_id)
    if run.info.status != "FINISHED":
        raise ConfigError(f"run {run_id} is {run.info.status}: only a FINISHED run's file can be registered")
    return run


def resolve_model_uri(uri: str) -> tuple[Path, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → its .tflite file (downloaded) and the run
    it was registered from."""
    client = MlflowClient()
    body = uri[len("models:/"):]
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = body.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (mlflow.exceptions.MlflowException, ValueError) as error:
        known = sorted(m.name for m in client.search_registered_models())
        raise InputNotFoundError(f"{uri} is not in the model registry of {mlflow.get_tracking_uri()} "
                                 f"(registered models: {', '.join(known) or 'none'})") from error
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}"))
    files = sorted(local.rglob("*.tflite"))
    if not files:
        raise InputNotFoundError(f"{uri} (version {version.version}) holds no .tflite file")
    return files[0], version.tags.get("source_run")
