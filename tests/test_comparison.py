"""compare.py's results table: one row per artifact, latencies measured again side by side."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from deeplabq import quantization as Q
from deeplabq.model import DeepLabSpec, build_deeplab
from deeplabq.tasks.compare import run_comparison


def test_table_of_finished_stages_times_every_file_again(tmp_path):
    model = build_deeplab(DeepLabSpec(num_classes=3, crop_size=(33, 33), depth_multiplier=0.35))
    calibration = list(np.random.default_rng(0).uniform(0, 255, (2, 33, 33, 3)).astype(np.float32))
    out, docs, store = tmp_path / "compare", tmp_path / "docs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError, match="--table-only: .*float/metrics.json does not exist"):
        run_comparison("camvid", [0.5], [], out, store, docs, table_only=True)

    float_file, int8_file = Q.float_tflite(model), Q.ptq_int8_tflite(model, calibration)
    # The float run exported int8 too; the ptq stage's own int8 (and not its copy of float) replaces it.
    # qat_delayed has not run: the table has the stages that finished.
    files = {("float", "float"): float_file, ("float", "int8"): int8_file, ("ptq", "float"): float_file,
             ("ptq", "int8"): int8_file, ("qat_finetune", "qat_int8"): int8_file}
    for stage in ("float", "ptq", "qat_finetune"):
        metrics = {"wall_time_s": 60.0}
        for (file_stage, artifact), tflite in files.items():
            if file_stage == stage:
                (out / "dm0.5" / stage / "tflite").mkdir(parents=True, exist_ok=True)
                (out / "dm0.5" / stage / "tflite" / f"{artifact}.tflite").write_bytes(tflite)
                metrics.update({f"{artifact}/miou": 50.0 if artifact == "float" else 49.0,
                                f"{artifact}/size_bytes": len(tflite),
                                f"{artifact}/latency_ms_t1": 1e6, f"{artifact}/latency_ms_t2": 1e6})
        (out / "dm0.5" / stage / "metrics.json").write_text(json.dumps(metrics))

    table = run_comparison("camvid", [0.5], [], out, store, docs, table_only=True).splitlines()
    assert [line.split(" | ")[1] for line in table[2:]] == ["float", "int8 (ptq)", "qat_int8 (qat_finetune)"]
    assert table[3].startswith("| 0.5 | int8 (ptq) | 49.00 | -1.00 |")
    rows = json.loads((docs / "camvid_results.json").read_text())
    assert rows[1]["path"] == str(out / "dm0.5" / "ptq" / "tflite" / "int8.tflite")
    for row in rows:
        assert 0 < row["latency_t1"] < 1e4 and 0 < row["latency_t2"] < 1e4  # measured now, not the runs' 1e6
    assert rows[0]["speedup_t1"] == 1.0 and rows[0]["speedup_t2"] == 1.0
    assert (docs / "camvid_results.png").stat().st_size > 10_000
    client = MlflowClient(store)
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.info.status == "FINISHED"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "camvid_results.md", "camvid_results.json", "camvid_results.png"}


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
