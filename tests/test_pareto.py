"""The Pareto front: marked in compare.py's table and figure, in the sweep parent's summary and figure."""

import math

from deeplabq import figures
from deeplabq.pareto import dominates, pareto_front
from deeplabq.tasks import compare


def _row(name, miou, latency, size):
    return {"dm": 0.5, "artifact": name, "path": f"/x/{name}.tflite", "miou": miou, "delta": 0.0,
            "size_bytes": size, "latency_t1": latency, "latency_t2": latency, "speedup_t1": 1.0, "speedup_t2": 1.0,
            "stage_time_min": 1.0}


def test_front_keeps_what_no_other_artifact_beats_on_all_three():
    rows = [_row("float", 49.9, 2.4, 2_700_000), _row("float16", 49.9, 2.4, 1_400_000),  # float16 beats float
            _row("dynamic_range", 50.1, 5.2, 850_000), _row("int8", 49.7, 1.9, 935_000),
            _row("int8_per_tensor", 49.0, 1.9, 740_000), _row("slow_big_bad", 40.0, 9.0, 3_000_000),
            _row("int8_copy", 49.7, 1.9, 935_000)]  # equal to int8 on all three: both stay
    assert pareto_front(rows) == [False, True, True, True, True, False, True]


def test_missing_objectives_are_left_out_of_the_comparison():
    assert dominates({"miou": 2, "latency_t1": 1}, {"miou": 1, "latency_t1": math.nan})
    assert not dominates({"miou": math.nan}, {"miou": 1.0})
    assert pareto_front([{"miou": 1.0}, {"latency_t1": 1.0}]) == [True, True]


def test_compare_marks_the_front_in_its_table_and_figure(tmp_path):
    rows = [_row("float", 49.9, 2.4, 2_700_000), _row("float16", 49.9, 2.4, 1_400_000),
            _row("int8", 49.7, 1.9, 935_000)]
    compare.mark_pareto(rows)
    assert [r["pareto"] for r in rows] == [False, True, True]
    table = compare.markdown_table(rows)
    assert "| Pareto |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("|  |") and table.splitlines()[3].endswith("| ✓ |")
    compare.plot(rows, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 10_000


def test_tradeoff_figure_draws_points_on_the_front(tmp_path):
    points = [{"name": "a", "miou": 50.0, "latency_ms": 2.0, "size_bytes": 1e6, "pareto": True},
              {"name": "b", "miou": 40.0, "latency_ms": 3.0, "size_bytes": 2e6, "pareto": False}]
    path = figures.tradeoff_figure(points, tmp_path / "tradeoff.png")
    assert path.stat().st_size > 10_000


def test_sweep_summary_marks_the_jobs_on_the_front(mlflow_store):
    from mlflow.tracking import MlflowClient

    from deeplabq import sweep

    client = MlflowClient()
    experiment = client.create_experiment("pareto")
    parent = client.create_run(experiment, run_name="sweep x=1,2,3")
    jobs = {"good": (50.0, 2.0, 900_000), "dominated": (49.0, 2.5, 950_000), "fast": (45.0, 1.0, 900_000)}
    for name, (miou, latency, size) in jobs.items():
        run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id,
                                                                  "deeplabq.deploy_artifact": "int8"})
        for key, value in {"deploy/miou": miou, "deploy/latency_ms_t1": latency, "deploy/size_bytes": size}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    table, points, best = sweep.summarize(client, client.get_run(parent.info.run_id))
    marks = {line.split(" | ")[0][2:]: line.rsplit("|", 2)[1].strip() for line in table.splitlines()[2:]}
    assert marks == {"good": "✓", "dominated": "", "fast": "✓"}
    assert {p["name"]: p["pareto"] for p in points} == {"good": True, "dominated": False, "fast": True}
    assert best.info.run_name == "good"
