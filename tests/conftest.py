# deeplabq sets TF_USE_LEGACY_KERAS, which must happen before any test module imports TensorFlow.
import deeplabq  # noqa: F401, I001

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tf_keras as keras
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from PIL import Image

from deeplabq.model import DeepLabSpec, build_deeplab
from deeplabq.quantization import float_tflite

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
    "export.isolate_conversion=false",  # a conversion child costs seconds per run: tests that need it turn it on
]


def make_bad_folder_dataset(root: Path) -> dict[str, Path]:
    """A ``folder`` dataset (3 classes, 255 ignored) of 24x32 pairs: two good ones in train; in val one good pair,
    a truncated image, a label of the wrong size and a label holding class 7. Returns the bad files by fault."""
    rng = np.random.default_rng(0)
    label = np.broadcast_to(np.array([0, 1, 2, 255])[np.arange(32) * 4 // 32], (24, 32)).astype(np.uint8)
    pairs = {"train": {"a": label, "b": label}, "val": {"good": label, "truncated": label, "wrong_size": label[:20],
                                                         "out_of_range": np.where(label == 1, 7, label)}}
    for split, stems in pairs.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem, values in stems.items():
            image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{stem}.jpg")
            Image.fromarray(values.astype(np.uint8)).save(root / "labels" / split / f"{stem}.png")
    truncated = root / "images" / "val" / "truncated.jpg"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 2 // 3])
    return {"truncated": truncated, "wrong_size": root / "labels" / "val" / "wrong_size.png",
            "out_of_range": root / "labels" / "val" / "out_of_range.png"}


def tiny_folder_overrides(root: Path) -> list[str]:
    """TINY on a ``folder`` dataset at ``root`` (3 classes, as ``make_bad_folder_dataset`` writes)."""
    synthetic_only = ("dataset=", "dataset.splits.", "dataset.image_size=")
    return [*(o for o in TINY if not o.startswith(synthetic_only)), "dataset=folder", f"dataset.root={root}",
            "dataset.num_classes=3"]


_STORE_TEMPLATE: list[Path] = []


def fresh_store(path: Path) -> Path:
    """An empty sqlite MLflow store at ``path`` (unless one is there): a copy of one made once per process, as
    creating the tables takes seconds (more on a loaded machine) and nearly every test needs a store."""
    if not path.exists():
        if not _STORE_TEMPLATE:
            template = Path(tempfile.mkdtemp(prefix="deeplabq-store-template-")) / "mlflow.db"
            MlflowClient(f"sqlite:///{template}").search_experiments()
            _STORE_TEMPLATE.append(template)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_STORE_TEMPLATE[0], path)
    return path


def compose_config(tmp_path: Path, overrides=(), config_name: str = "train", output: str = "run"):
    """A composed config whose outputs and MLflow store (sqlite) live under tmp_path."""
    store = fresh_store(tmp_path / "mlflow.db")
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


# The tiny float run that several files start from (PTQ, QAT fine-tune, convert, evaluate, mismatches).
TINY_FLOAT_RUN = [*TINY, "train.steps=24", "train.learning_rate=0.05", "export.ptq_variants=[dynamic_range]"]


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run: its folder, its MLflow store and run id, and the metrics train() returned."""

    path: Path
    store: str
    run_id: str
    metrics: dict


@pytest.fixture(scope="session")
def tiny_float_run(tmp_path_factory) -> FinishedRun:
    """TINY_FLOAT_RUN trained once per test process (shared: add runs to its store only by run id, never
    change its folder)."""
    from deeplabq.tasks.train import train

    tmp_path = tmp_path_factory.mktemp("tiny_float_run")
    metrics = train(compose_config(tmp_path, TINY_FLOAT_RUN), tmp_path / "run")
    return FinishedRun(tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", run_id_of(tmp_path / "run"), metrics)


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


# A DeepLab that converts in about a second, for the synthetic dataset (5 classes) at TINY_DATASET's size.
TINY_SPEC = DeepLabSpec(num_classes=5, crop_size=(33, 33), depth_multiplier=0.35, aspp_channels=16,
                        decoder_channels=16)
TINY_DATASET = ["dataset.image_size=[28,32]", "dataset.crop_size=[33,33]"]
# With TINY_DATASET: a config whose model is TINY_SPEC (the conversion process rebuilds the model from its spec).
TINY_ARCHITECTURE = ["backbone.depth_multiplier=0.35", "head.aspp_channels=16", "head.decoder_channels=16"]


def tiny_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random 33x33 RGB images, float 0..255 (integer values, as decoded pixels are)."""
    rng = np.random.default_rng(seed)
    return list(np.round(rng.uniform(0, 255, (count, 33, 33, 3))).astype(np.float32))


@pytest.fixture(scope="session")
def tiny_model():
    """A seeded random-weight TINY_SPEC model (shared: do not change its weights)."""
    keras.utils.set_random_seed(0)
    return build_deeplab(TINY_SPEC)


@pytest.fixture(scope="session")
def tiny_float_tflite(tiny_model) -> bytes:
    """The float32 TFLite file of ``tiny_model`` (float 0..255 input, int32 labels out)."""
    return float_tflite(tiny_model)


@pytest.fixture
def mlflow_store(tmp_path) -> str:
    """An empty sqlite store at tmp_path/mlflow.db (where compose_config points), made the tracking URI."""
    uri = f"sqlite:///{fresh_store(tmp_path / 'mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


def start_test_run(tmp_path: Path):
    """An active MLflow run in its own experiment, artifacts under tmp_path (not the Default experiment's)."""
    experiment = MlflowClient().create_experiment("unit", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return mlflow.start_run(experiment_id=experiment)


def pytest_collection_modifyitems(session, config, items):
    """The README's commands (the longest file, one sandbox) first: with two workers (``bash dev.sh test``
    runs ``-n 2 --dist loadfile``), one worker runs them while the other runs every other file."""
    items.sort(key=lambda item: not item.nodeid.split("::")[0].startswith("tests/test_readme"))
