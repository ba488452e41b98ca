# deeplabq sets TF_USE_LEGACY_KERAS, which must happen before any test module imports TensorFlow.
import deeplabq  # noqa: F401, I001

import json
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# A DeepLab job small enough for a unit test: 65x65 synthetic scenes, a few dozen steps.
TINY = [
    "dataset=synthetic",
    "dataset.splits.train=24",
    "dataset.splits.val=6",
    "dataset.image_size=[60,64]",
    "dataset.crop_size=[65,65]",
    "dataset.calibration_samples=4",
    "train.steps=12",
    "train.batch_size=4",
    "train.log_every_steps=4",
    "train.checkpoint_every_steps=6",
    "eval.latency_runs=2",
    "eval.latency_warmup=1",
    "export.agreement_images=2",
    "export.ptq_variants=[]",
]


def compose_config(tmp_path: Path, overrides=(), config_name: str = "train", output: str = "run"):
    """A composed config whose outputs and MLflow store (sqlite) live under tmp_path."""
    store = tmp_path / "mlflow.db"
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(
            config_name,
            overrides=[
                f"paths.output_dir={tmp_path / output}",
                f"tracking.tracking_uri=sqlite:///{store}",
                f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
                *overrides,
            ],
        )


@pytest.fixture
def tiny_overrides():
    return list(TINY)


def only_run(tmp_path: Path, status: str | None = None):
    """The single MLflow run of the temp store (asserting there is exactly one)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], order_by=["attributes.start_time ASC"]
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    if status:
        assert runs[0].info.status == status, runs[0].data.tags.get("deeplabq.error")
    return runs[0]


def run_id_of(output_dir: Path) -> str:
    return json.loads((output_dir / "mlflow_run.json").read_text())["run_id"]
