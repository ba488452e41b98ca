"""Where a trained model comes from: a run output dir, a checkpoint prefix, an MLflow run id, or a .tflite file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from deeplabq import checkpoints, tracking
from deeplabq.errors import ConfigError, InputNotFoundError
from deeplabq.model import DeepLabSpec, build_deeplab
from deeplabq.model_registry import resolve_model_uri
from deeplabq.quantization import quantize_model

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT_DIR = tracking.CHECKPOINT_DIR
PHASE_FILE = "phase.json"


@dataclass
class ModelSource:
    kind: str  # "tflite" | "checkpoint"
    path: Path  # the .tflite file or the checkpoint prefix
    run_id: str | None = None  # MLflow run this model belongs to, if known
    run_config: DictConfig | None = None  # config the model was trained with, if known
    quantized: bool = False  # checkpoint of a fake-quantized (QAT) model

    def describe(self) -> str:
        return f"{self.kind} {self.path}" + (f" (MLflow run {self.run_id})" if self.run_id else "")


def _checkpoint_in(directory: Path) -> tuple[Path, bool] | None:
    """Latest checkpoint prefix in ``directory`` and whether it is of a quantized model."""
    latest = tf.train.latest_checkpoint(str(directory))
    if latest is None:
        return None
    phase = directory / PHASE_FILE
    quantized = json.loads(phase.read_text()).get("quantized", False) if phase.exists() else False
    return Path(latest), quantized


RUN_CONFIGS = ("config.yaml", ".hydra/config.yaml")  # MLflow's copy of a run, Hydra's run dir


def _run_config(run_dir: Path) -> DictConfig | None:
    for name in RUN_CONFIGS:
        if (run_dir / name).is_file():
            return OmegaConf.load(run_dir / name)
    return None


def _run_id_of(run_dir: Path) -> str | None:
    """The MLflow run of a run output dir (its mlflow_run.json) or of a run's artifact dir (.../<run id>/artifacts)."""
    if (run_dir / tracking.RUN_ID_FILE).is_file():
        return json.loads((run_dir / tracking.RUN_ID_FILE).read_text())["run_id"]
    if run_dir.name == "artifacts" and RUN_ID.match(run_dir.parent.name):
        return run_dir.parent.name
    return None


def _enclosing_run_dir(file: Path) -> Path | None:
    """The run directory a file was written into (``<run>/tflite/int8.tflite``), if it is inside one."""
    for parent in list(file.resolve().parents)[:3]:
        if (parent / tracking.RUN_ID_FILE).is_file() or any((parent / name).is_file() for name in RUN_CONFIGS):
            return parent
    return None


def _run_dir_source(run_dir: Path, run_id: str | None) -> ModelSource:
    found = _checkpoint_in(run_dir / CHECKPOINT_DIR) or _checkpoint_in(run_dir)
    if found is None:
        raise InputNotFoundError(f"no checkpoint in {run_dir} (looked in {run_dir / CHECKPOINT_DIR})")
    return ModelSource("checkpoint", found[0], run_id or _run_id_of(run_dir), _run_config(run_dir), found[1])


def resolve_source(source: str) -> ModelSource:
    """Interpret what the user gave as a model source; errors name the value."""
    if source is None or str(source) in ("", "???"):
        raise ConfigError("no model source given: set source=<.tflite file | run dir | checkpoint | MLflow run id>")
    text = str(source)
    path = Path(text)
    if text.endswith(".tflite"):
        if not path.is_file():
            raise InputNotFoundError(f"TFLite file {path} does not exist")
        run_dir = _enclosing_run_dir(path)
        if run_dir is None:
            return ModelSource("tflite", path)
        return ModelSource("tflite", path, _run_id_of(run_dir), _run_config(run_dir))
    if path.is_dir():
        return _run_dir_source(path, None)
    if Path(text + ".index").is_file():
        found = _checkpoint_in(path.parent)
        return ModelSource("checkpoint", path, None, None, bool(found and found[1]))
    if RUN_ID.match(text):
        tracking.check_run_exists(text)
        return _run_dir_source(tracking.run_artifact_dir(text), text)
    if text.startswith("models:/"):
        tflite, run_id = resolve_model_uri(text)
        config = _run_config(tracking.run_artifact_dir(run_id)) if run_id else None
        return ModelSource("tflite", tflite, run_id, config)
    raise InputNotFoundError(f"model source '{text}' is not a .tflite file, a run directory, a checkpoint "
                            f"prefix, an MLflow run id or a registered model (models:/<name>@<alias>)")


RUN_GROUPS = ("backbone", "head", "dataset")


def with_run_architecture(cfg: DictConfig, source: ModelSource, overrides: list[str] = ()) -> DictConfig:
    """``cfg`` with backbone, head and dataset (its preprocessing included) taken from the run the model was
    trained in, if known. What the user set on the command line (``overrides``) still wins: a ``dataset.*``
    key, or a ``dataset=<option>`` other than the run's."""
    if source.run_config is None:
        return cfg
    merged = cfg.copy()
    chosen = dict(o.split("=", 1) for o in overrides if "=" in o)
    run_dataset = source.run_config.dataset.get("name") if "dataset" in source.run_config else None
    other_dataset = chosen.get("dataset", run_dataset) != run_dataset  # the architecture always follows the run
    with open_dict(merged):
        for group in RUN_GROUPS:
            if group not in source.run_config or (group == "dataset" and other_dataset):
                continue
            merged[group] = source.run_config[group]
            for key, value in chosen.items():
                if key.startswith(f"{group}."):
                    OmegaConf.update(merged, key, yaml.safe_load(value), force_add=True)
    return merged


def load_keras_model(model_spec: DeepLabSpec, source: ModelSource, key: str = "source"):
    """Build the model ``model_spec`` describes (QAT-wrapped if the checkpoint is) and restore its weights."""
    model = build_deeplab(model_spec)
    if source.quantized:
        model = quantize_model(model)
    load_weights(model, source, key, model_spec)
    return model


ARCHITECTURE_KEYS = {"dataset.num_classes": "num_classes", "backbone.depth_multiplier": "depth_multiplier",
                     "backbone.output_stride": "output_stride", "head.decoder_output_stride": "decoder_output_stride"}


def architecture_differences(source: ModelSource, model_spec: DeepLabSpec | None) -> str:
    """``backbone.depth_multiplier=1.0 (this config: 0.5), ...``: where the source's run config and the model
    differ, when the run config is known."""
    if model_spec is None or source.run_config is None:
        return ""
    found = []
    for key, field_name in ARCHITECTURE_KEYS.items():
        theirs = OmegaConf.select(source.run_config, key, default=None)
        ours = getattr(model_spec, field_name)
        if theirs is not None and str(theirs) != str(ours) and not _same_number(theirs, ours):
            found.append(f"{key}={theirs} (this config: {ours})")
    return "its run has " + ", ".join(found) if found else ""


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def load_weights(model, source: ModelSource, key: str, model_spec: DeepLabSpec | None = None) -> None:
    """Restore ``source``'s checkpoint into ``model``; a mismatch names ``key`` (the config key that pointed at
    the checkpoint) and the architecture values that differ."""
    try:
        checkpoints.load_run_weights(model, source.path)
    except checkpoints.CheckpointMismatchError as error:
        raise error.naming(f"{key}={source.describe()}", architecture_differences(source, model_spec)) from None
