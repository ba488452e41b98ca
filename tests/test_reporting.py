"""deeplabq.reporting: the summary table, shipping one artifact, calibration images, and export_and_measure's
per-variant failures, with a real tiny model and a real sqlite MLflow store."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from deeplabq import data as data_lib
from deeplabq import export, reporting
from deeplabq.config import QuantSpec, RunSpec

from .conftest import TINY, TINY_DATASET, compose_config, start_test_run

METRICS = {"keras/miou": 52.0,
           "float/miou": 50.0, "float/size_bytes": 4096, "float/latency_ms_t1": 4.0, "float/latency_ms_t2": 2.0,
           "int8/miou": 48.5, "int8/size_bytes": 1024, "int8/latency_ms_t1": 1.0, "int8/latency_ms_t2": 1.0}
SHIPPED = {"deploy/miou": 48.5, "deploy/size_bytes": 1024}


def cells(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(" | ")] for line in table.splitlines()]


def test_summary_table_marks_the_shipped_artifact_and_compares_with_float():
    rows = cells(reporting.summary_table({**METRICS, **SHIPPED}, [1, 2]))
    assert rows[0] == ["artifact", "mIoU (%)", "Δ vs float", "size (KB)", "latency 1t (ms)", "latency 2t (ms)",
                       "speed-up 1t", "speed-up 2t"]
    assert rows[2] == ["keras", "52.00", "", "", "", "", "", ""]
    assert rows[3] == ["float", "50.00", "", "4.0", "4.00", "2.00", "1.00x", "1.00x"]
    assert rows[4] == ["int8 *", "48.50", "-1.50", "1.0", "1.00", "1.00", "4.00x", "2.00x"]
    assert rows[5] == ["* shipped: tflite/int8.tflite (its metrics are also logged as deploy/*)"]


def test_summary_table_without_deploy_or_float_marks_and_compares_nothing():
    table = reporting.summary_table(METRICS, [1])
    assert "*" not in table and len(table.splitlines()) == 5
    int8_only = {k: v for k, v in METRICS.items() if not k.startswith("float/")}
    rows = cells(reporting.summary_table(int8_only, [1]))
    assert rows[3] == ["int8", "48.50", "", "1.0", "1.00", ""]


def test_ship_logs_deploy_metrics_and_tags_in_the_active_run(tmp_path, mlflow_store):
    with start_test_run(tmp_path) as run:
        shipped = reporting.ship(METRICS, "int8", "float/miou")
        assert reporting.ship(METRICS, "qat_int8", "float/miou") == {}  # not in this run: nothing logged
    assert shipped == {"deploy/miou": 48.5, "deploy/size_bytes": 1024, "deploy/latency_ms_t1": 1.0,
                       "deploy/latency_ms_t2": 1.0, "deploy/delta_miou": -1.5}
    logged = MlflowClient().get_run(run.info.run_id).data
    assert {k: v for k, v in logged.metrics.items() if k.startswith("deploy/")} == shipped
    assert logged.tags["deeplabq.deploy_artifact"] == "int8"
    assert logged.tags["deeplabq.deploy_file"] == "tflite/int8.tflite"


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """A composed TINY config at conftest.TINY_SPEC's size, and its train split (24 images)."""
    cfg = compose_config(tmp_path_factory.mktemp("reporting"), [*TINY, *TINY_DATASET])
    return cfg, data_lib.open_split(cfg.dataset, "train")


def test_calibration_count_above_the_split_is_refused(tiny_cfg):
    _, train = tiny_cfg
    reporting.check_calibration_count(QuantSpec(mode="ptq", calibration_samples=24), train)
    with pytest.raises(ValueError, match=r"quant.calibration_samples=25 is larger than the 'train' split \(24 images"):
        reporting.check_calibration_count(QuantSpec(mode="ptq", calibration_samples=25), train)


def test_calibration_images_are_fixed_by_the_seed_listed_and_logged(tmp_path, mlflow_store, tiny_cfg):
    cfg, train = tiny_cfg
    listing = tmp_path / "calibration_images.txt"
    with start_test_run(tmp_path) as run:
        images = reporting.calibration_images(QuantSpec(mode="ptq", calibration_samples=3, calibration_seed=5),
                                              cfg.dataset, train, tmp_path)
        chosen = listing.read_text().splitlines()
        again = reporting.calibration_images(QuantSpec(mode="ptq", calibration_samples=3, calibration_seed=5),
                                             cfg.dataset, train, tmp_path)
        assert listing.read_text().splitlines() == chosen
        reporting.calibration_images(QuantSpec(mode="ptq", calibration_samples=3, calibration_seed=6),
                                     cfg.dataset, train, tmp_path)
        assert listing.read_text().splitlines() != chosen
    indices = [train.describe(i) for i in range(len(train))]
    assert len(chosen) == 3 and chosen == sorted(chosen) and set(chosen) <= set(indices)
    for image, same, line in zip(images, again, chosen, strict=True):
        assert image.shape == (33, 33, 3)  # padded to the crop size, as for eval
        np.testing.assert_array_equal(image, same)
        expected = data_lib.preprocess_for_eval(train.load(indices.index(line))[0], None, cfg.dataset)[0]
        np.testing.assert_array_equal(image, expected)
    assert "calibration_images.txt" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}


def test_a_failing_variant_is_tagged_and_named_and_the_others_are_kept(tmp_path, mlflow_store, tiny_cfg,
                                                                     tiny_model):
    """Converting in this process (TINY: export.isolate_conversion=false); test_conversion_process: in a child."""
    cfg, train = tiny_cfg
    spec = RunSpec.from_config(compose_config(tmp_path, [*TINY, *TINY_DATASET, "eval.max_images=1",
                                                         "eval.latency_threads=[1]"]))
    with start_test_run(tmp_path) as run:
        with pytest.raises(export.ExportError, match="TFLite variant 'qat_int8' needs a QAT model"):
            reporting.export_and_measure(spec, tmp_path / "out", ["qat_int8", "float"], train_split=train,
                                         eval_split=data_lib.open_split(cfg.dataset, "val"), float_model=tiny_model)
    assert sorted(p.name for p in (tmp_path / "out" / "tflite").iterdir()) == ["float.tflite"]
    logged = MlflowClient().get_run(run.info.run_id).data
    assert "needs a QAT model" in logged.tags["deeplabq.export_error.qat_int8"]
    assert logged.metrics["float/agreement"] >= 0.99 and "float/latency_ms_t1" in logged.metrics
    assert logged.metrics["float/size_bytes"] == (tmp_path / "out" / "tflite" / "float.tflite").stat().st_size
    assert not any(key.startswith("qat_int8/") for key in logged.metrics)
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "tflite")} == {
        "tflite/float.tflite", "tflite/float_ops.json"}


def test_run_location_names_the_active_run(tmp_path, mlflow_store, capsys):
    reporting.print_run_location(tmp_path)
    assert capsys.readouterr().out == ""
    with start_test_run(tmp_path) as run:
        reporting.print_run_location(tmp_path)
    out = capsys.readouterr().out
    assert f"MLflow run {run.info.run_id} ({run.info.run_name}), files in {tmp_path}" in out
    assert f"mlflow ui --backend-store-uri {mlflow_store}" in out
