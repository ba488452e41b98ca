"""Where a trained model comes from: a run output dir, a checkpoint prefix, an MLflow run id, or a .tflite file."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf
from omegaconf import DictConfig, OmegaConf, open_dict

from deeplabq import tracking

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CHECKPOINT_DIR = "checkpoints"
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


def _run_dir_source(run_dir: Path, run_id: str | None) -> ModelSource:
    found = _checkpoint_in(run_dir / CHECKPOINT_DIR) or _checkpoint_in(run_dir)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir} (looked in {run_dir / CHECKPOINT_DIR})")
    config = None
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            config = OmegaConf.load(candidate)
            break
    if run_id is None and (run_dir / tracking.RUN_ID_FILE).is_file():
        run_id = json.loads((run_dir / tracking.RUN_ID_FILE).read_text())["run_id"]
    return ModelSource("checkpoint", found[0], run_id, config, found[1])


def resolve_source(source: str) -> ModelSource:
    """Interpret what the user gave as a model source; errors name the value."""
    if source is None or str(source) in ("", "???"):
        raise ValueError("no model source given: set source=<.tflite file | run dir | checkpoint | MLflow run id>")
    text = str(source)
    path = Path(text)
    if text.endswith(".tflite"):
        if not path.is_file():
            raise FileNotFoundError(f"TFLite file {path} does not exist")
        return ModelSource("tflite", path)
    if path.is_dir():
        return _run_dir_source(path, None)
    if Path(text + ".index").is_file():
        found = _checkpoint_in(path.parent)
        return ModelSource("checkpoint", path, None, None, bool(found and found[1]))
    if RUN_ID.match(text):
        tracking.check_run_exists(text)
        return _run_dir_source(tracking.run_artifact_dir(text), text)
    raise FileNotFoundError(f"model source '{text}' is not a .tflite file, a run directory, a checkpoint "
                            f"prefix or an MLflow run id")


def with_run_architecture(cfg: DictConfig, source: ModelSource) -> DictConfig:
    """``cfg`` with backbone, head and dataset taken from the run the model was trained in (if known)."""
    if source.run_config is None:
        return cfg
    merged = cfg.copy()
    with open_dict(merged):
        for key in ("backbone", "head", "dataset"):
            if key in source.run_config:
                merged[key] = source.run_config[key]
    return merged


def load_keras_model(cfg: DictConfig, source: ModelSource):
    """Build the model the config describes (QAT-wrapped if the checkpoint is) and restore its weights."""
    from deeplabq import checkpoints
    from deeplabq.model import build_deeplab, spec_from_config

    model = build_deeplab(spec_from_config(cfg))
    if source.quantized:
        from deeplabq.quantization import quantize_model

        model = quantize_model(model)
    checkpoints.load_run_weights(model, source.path)
    return model
