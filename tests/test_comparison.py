"""compare.py's results table: one row per artifact, latencies measured again side by side."""

import numpy as np

from deeplabq import quantization as Q
from deeplabq.comparison import markdown_table, remeasure_latency, results_rows
from deeplabq.model import DeepLabSpec, build_deeplab


def test_results_rows_are_timed_again_in_one_process(tmp_path):
    model = build_deeplab(DeepLabSpec(num_classes=3, crop_size=(33, 33), depth_multiplier=0.35))
    calibration = list(np.random.default_rng(0).uniform(0, 255, (2, 33, 33, 3)).astype(np.float32))
    dirs = {stage: tmp_path / stage for stage in ("float", "ptq", "qat_finetune")}
    float_file, int8_file = Q.float_tflite(model), Q.ptq_int8_tflite(model, calibration)
    # The float run exported int8 too; the ptq stage's own int8 (and not its copy of float) replaces it.
    files = {("float", "float"): float_file, ("float", "int8"): int8_file, ("ptq", "float"): float_file,
             ("ptq", "int8"): int8_file, ("qat_finetune", "qat_int8"): int8_file}
    stage_metrics = {stage: {} for stage in dirs}
    for (stage, artifact), tflite in files.items():
        (dirs[stage] / "tflite").mkdir(parents=True, exist_ok=True)
        (dirs[stage] / "tflite" / f"{artifact}.tflite").write_bytes(tflite)
        stage_metrics[stage].update({f"{artifact}/miou": 0.5 if artifact == "float" else 0.49,
                                     f"{artifact}/size_bytes": len(tflite),
                                     f"{artifact}/latency_ms_t1": 1e6, f"{artifact}/latency_ms_t2": 1e6})

    rows = results_rows(stage_metrics, 0.5, dirs)
    assert [r["artifact"] for r in rows] == ["float", "int8 (ptq)", "qat_int8 (qat_finetune)"]
    assert rows[1]["path"] == str(dirs["ptq"] / "tflite" / "int8.tflite")
    assert abs(rows[1]["delta"] + 0.01) < 1e-9
    remeasure_latency(rows, runs=3)
    for row in rows:
        assert 0 < row["latency_t1"] < 1e4 and 0 < row["latency_t2"] < 1e4  # measured now, not the runs' 1e6
    assert rows[0]["speedup_t1"] == 1.0 and rows[0]["speedup_t2"] == 1.0
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| 0.5 | int8 (ptq) | 49.00 | -1.00 |" in table[3]
