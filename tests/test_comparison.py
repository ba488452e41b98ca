"""compare.py's results table: one row per artifact, latencies measured again side by side."""

import numpy as np

from deeplabq import quantization as Q
from deeplabq.comparison import markdown_table, remeasure_latency, results_rows
from deeplabq.model import DeepLabSpec, build_deeplab


def test_results_rows_are_timed_again_in_one_process(tmp_path):
    model = build_deeplab(DeepLabSpec(num_classes=3, crop_size=(33, 33), depth_multiplier=0.35))
    calibration = list(np.random.default_rng(0).uniform(0, 255, (2, 33, 33, 3)).astype(np.float32))
    dirs = {"float": tmp_path / "float", "qat_finetune": tmp_path / "qat_finetune"}
    files = {("float", "float"): Q.float_tflite(model), ("float", "int8"): Q.ptq_int8_tflite(model, calibration),
             ("qat_finetune", "qat_int8"): Q.ptq_int8_tflite(model, calibration)}
    stage_metrics = {"float": {}, "qat_finetune": {}}
    for (stage, artifact), tflite in files.items():
        (dirs[stage] / "tflite").mkdir(parents=True, exist_ok=True)
        (dirs[stage] / "tflite" / f"{artifact}.tflite").write_bytes(tflite)
        stage_metrics[stage].update({f"{artifact}/miou": 0.5 if artifact == "float" else 0.49,
                                     f"{artifact}/size_bytes": len(tflite),
                                     f"{artifact}/latency_ms_t1": 1e6, f"{artifact}/latency_ms_t2": 1e6})

    rows = results_rows(stage_metrics, 0.5, dirs)
    assert [r["artifact"] for r in rows] == ["float", "int8", "qat_int8 (qat_finetune)"]
    assert abs(rows[1]["delta"] + 0.01) < 1e-9
    remeasure_latency(rows, runs=3)
    for row in rows:
        assert 0 < row["latency_t1"] < 1e4 and 0 < row["latency_t2"] < 1e4  # measured now, not the runs' 1e6
    assert rows[0]["speedup_t1"] == 1.0 and rows[0]["speedup_t2"] == 1.0
    table = markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows) and "| 0.5 | int8 | 49.00 | -1.00 |" in table[3]
