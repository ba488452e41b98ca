"""compare.py's results table: one row per artifact, latencies measured again side by side."""

import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deeplabq.tasks.compare import _stage_overrides, run_comparison, run_stage

from .conftest import TINY


def test_table_of_stages_that_ran_times_every_file_again(tmp_path, tiny_float_run):
    """The float stage is a finished tiny float run; the ptq stage runs through compare.py's stage runner (a
    train.py job of the camvid_ptq preset, on the synthetic data at TINY size); qat stages have not run."""
    out, docs, store = tmp_path / "compare", tmp_path / "docs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError, match="--table-only: .*float/metrics.json does not exist"):
        run_comparison("camvid", [0.5], [], out, store, docs, table_only=True)
    stages = out / "dm0.5"
    shutil.copytree(tiny_float_run.path, stages / "float")
    tiny = [*TINY, "dataset.min_resize_value=null", "dataset.max_resize_value=null", "dataset.max_scale_factor=1.25",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]
    ptq = run_stage("camvid_ptq", "mnv2_dm050", stages / "ptq",
                    [*_stage_overrides("ptq", stages / "float", store), *tiny], env=dict(os.environ))
    assert ptq == json.loads((stages / "ptq" / "metrics.json").read_text()) and ptq["wall_time_s"] > 0
    recorded = {"float": json.loads((stages / "float" / "metrics.json").read_text()), "ptq": ptq}

    table = run_comparison("camvid", [0.5], [], out, store, docs, table_only=True).splitlines()
    assert [line.split(" | ")[1] for line in table[2:]] == ["float", "dynamic_range", "int8 (ptq)"]
    rows = json.loads((docs / "camvid_results.json").read_text())
    for row, (stage, artifact) in zip(rows, [("float", "float"), ("float", "dynamic_range"), ("ptq", "int8")],
                                      strict=True):
        assert row["path"] == str(stages / stage / "tflite" / f"{artifact}.tflite") and Path(row["path"]).is_file()
        assert row["miou"] == recorded[stage][f"{artifact}/miou"]
        assert row["delta"] == pytest.approx(row["miou"] - recorded["float"]["float/miou"])
        assert row["size_bytes"] == Path(row["path"]).stat().st_size
        assert 0 < row["latency_t1"] < 1e4 and 0 < row["latency_t2"] < 1e4  # measured again, side by side
    assert table[4].startswith(f"| 0.5 | int8 (ptq) | {ptq['int8/miou']:.2f} |")
    assert rows[0]["speedup_t1"] == 1.0 and rows[0]["speedup_t2"] == 1.0
    assert (docs / "camvid_results.png").stat().st_size > 10_000
    client = MlflowClient(store)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("deeplabq.recipe") == "camvid" and r.info.status == "FINISHED"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "camvid_results.md", "camvid_results.json", "camvid_results.png"}
    (ptq_run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                  if r.data.tags.get("deeplabq.quant_mode") == "ptq"]
    assert ptq_run.info.status == "FINISHED" and ptq_run.data.metrics["int8/miou"] == ptq["int8/miou"]


def test_recipes_have_their_presets_and_own_stage_directories(tmp_path):
    from deeplabq.tasks.compare import RECIPES, ROOT, default_out_dir

    for recipe, stages in RECIPES.items():
        assert next(iter(stages)) == "float", recipe
        for preset in stages.values():
            assert (ROOT / "conf" / "experiment" / f"{preset}.yaml").is_file(), preset
    assert default_out_dir("camvid") == ROOT / "outputs" / "compare"
    assert default_out_dir("camvid_pascal") == ROOT / "outputs" / "compare_camvid_pascal"
    with pytest.raises(ValueError, match="depth multiplier"):
        run_comparison("camvid_pascal", [1.0], [], tmp_path, f"sqlite:///{tmp_path / 'm.db'}", tmp_path)
