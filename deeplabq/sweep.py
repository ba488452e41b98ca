"""Hydra callback: a multirun becomes one MLflow parent run with a child run per job, a summary and a figure.

Registered in conf/hydra/default.yaml. The parent's id reaches each job through DEEPLABQ_PARENT_RUN_ID,
which deeplabq.tracking turns into the ``mlflow.parentRunId`` tag (the MLflow UI nests children under it).
Works for in-process launchers (basic) and for launchers whose jobs inherit the environment: joblib, and
submitit's local and SLURM modes (conf/hydra/launcher/slurm*.yaml; sbatch passes the submitting environment on).

The parent is named after what the sweep varies, carries the command line's overrides as params, points at
the best child by ``deploy/miou`` (tags ``deeplabq.best_*``: the file to ship), and holds
``sweep_summary.md`` and ``tradeoff.png`` (deploy mIoU against latency and size, with the float baseline).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from deeplabq import cli, figures, mlflow_view, tracking
from deeplabq.errors import UserError
from deeplabq.pareto import pareto_front

# Runs with equal values of these params are comparable: the float run among them is the baseline.
FLOAT_TAG = "deeplabq.deploy_artifact"  # a run that ships its float file is a float baseline
BASELINE_KEYS = ("dataset.name", "dataset.crop_size", "backbone.depth_multiplier", "backbone.output_stride",
                 "head.name", "train.steps")


def sweep_overrides(task_overrides) -> dict[str, tuple[str, bool]]:
    """``{key: (value as typed, is swept)}`` of the command line, without where-to-log keys."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    return {o.get_key_element(): (o.input_line.split("=", 1)[1], o.is_sweep_override()) for o in parsed
            if not o.get_key_element().startswith(("tracking.", "hydra.", "hydra/"))}


def _key(run) -> tuple:
    return tuple(run.data.params.get(k) for k in BASELINE_KEYS)


def float_baselines(client: MlflowClient, experiment_id: str, children: list) -> dict[tuple, object]:
    """The float run each child compares with: a float child of the sweep, else the newest finished float run
    of the experiment with the same dataset, crop, backbone, head and steps."""
    wanted = {_key(c) for c in children}
    found = {_key(c): c for c in children
             if c.data.tags.get(FLOAT_TAG) == "float" and c.info.status == "FINISHED"}
    if wanted - set(found):
        candidates = client.search_runs([experiment_id], f"tags.`{FLOAT_TAG}` = 'float' and "
                                        "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                        max_results=500)
        for run in candidates:
            if _key(run) in wanted and _key(run) not in found and "deploy/miou" in run.data.metrics:
                found[_key(run)] = run
    return found


def _label(names: list[str]) -> list[str]:
    """Run names without the dash-separated parts that all of them share (what differs, for a legend)."""
    parts = [n.split("-") for n in names]
    common = set.intersection(*map(set, parts)) if len(parts) > 1 else set()
    return ["-".join(p for p in name if p not in common) or "-".join(name) for name in parts]


def _cell(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def summarize(client: MlflowClient, parent) -> tuple[str, list[dict], object | None]:
    """The summary table (markdown), the trade-off points and the best finished child by deploy/miou."""
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    baselines = float_baselines(client, parent.info.experiment_id, children)
    rows = ["| job | status | mode | delay | dm | ships | deploy mIoU (%) | Δ vs float | size (KB) | "
            "latency 1t / 2t (ms) | Pareto |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    points, row_runs = [], []
    for child, label in zip(children, _label([c.info.run_name for c in children]), strict=True):
        m, p = child.data.metrics, child.data.params
        base = baselines.get(_key(child))
        delta = (m["deploy/miou"] - base.data.metrics["deploy/miou"] if base is not None and "deploy/miou" in m
                 else m.get("deploy/delta_miou"))
        cells = [child.info.run_name, child.info.status, p.get("quant.mode", "?"),
                 child.data.tags.get("deeplabq.quant_delay", "–"), p.get("backbone.depth_multiplier", "?"),
                 child.data.tags.get("deeplabq.deploy_artifact", "–"), _cell(m.get("deploy/miou"), ".2f"),
                 _cell(delta, "+.2f"), _cell(m.get("deploy/size_bytes", math.nan) / 1024, ".0f"),
                 f"{_cell(m.get('deploy/latency_ms_t1'), '.2f')} / {_cell(m.get('deploy/latency_ms_t2'), '.2f')}"]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
        row_runs.append(child.info.run_id)
        if child.info.status == "FINISHED" and "deploy/miou" in m:
            points.append({"name": label, "miou": m["deploy/miou"], "size_bytes": m.get("deploy/size_bytes"),
                           "latency_ms": m.get("deploy/latency_ms_t1", math.nan), "run": child})
    for base in {b.info.run_id: b for b in baselines.values()}.values():
        if base.info.run_id not in {c.info.run_id for c in children}:
            m = base.data.metrics
            points.append({"name": f"float baseline ({base.info.run_name})", "miou": m["deploy/miou"],
                           "size_bytes": m.get("deploy/size_bytes"), "latency_ms": m.get("deploy/latency_ms_t1"),
                           "baseline": True})
        else:
            next(p for p in points if p.get("run") is base)["baseline"] = True
    rows[2:] = mark_pareto(points, rows[2:], row_runs)
    finished = [c for c in children if c.info.status == "FINISHED" and "deploy/miou" in c.data.metrics]
    best = max(finished, key=lambda c: c.data.metrics["deploy/miou"], default=None)
    return "\n".join(rows), points, best


def mark_pareto(points: list[dict], rows: list[str], row_runs: list[str]) -> list[str]:
    """Set ``point["pareto"]`` for every trade-off point (the jobs and the float baseline: deploy mIoU, 1-thread
    latency, size; deeplabq.pareto); return the jobs' ``rows`` (of runs ``row_runs``) with their last column:
    ✓ on the front."""
    for point, on_front in zip(points, pareto_front(
            [{"miou": p["miou"], "latency_t1": p.get("latency_ms"), "size_bytes": p.get("size_bytes")}
             for p in points]), strict=True):
        point["pareto"] = on_front
    front = {p["run"].info.run_id for p in points if p["pareto"] and "run" in p}
    return [row + (" ✓ |" if run_id in front else "  |") for row, run_id in zip(rows, row_runs, strict=True)]


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.config: DictConfig | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            experiment_id = tracking.setup_mlflow(config.tracking)
        except UserError as error:  # a refused login, a bad URI: one line before any job, as a job would say it
            print(f"deeplabq: error: {error}", file=sys.stderr)
            sys.exit(2)
        overrides = sweep_overrides(config.hydra.overrides.task)
        swept = " ".join(f"{k}={v}" for k, (v, is_swept) in overrides.items() if is_swept)
        client = MlflowClient()
        run = client.create_run(experiment_id, run_name=f"sweep {swept}"[:120], tags={
            "deeplabq.sweep": "parent", "deeplabq.task": "sweep",
            "deeplabq.sweep_overrides": " ".join(f"{k}={v}" for k, (v, _) in overrides.items()),
            **tracking.process_tags()})  # judged by this process (mark_dead_runs), not by its jobs
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, (v, _) in overrides.items()])
        self.parent_run_id, self.config = run.info.run_id, config
        os.environ[tracking.PARENT_ENV] = self.parent_run_id
        atexit.register(self._close, failed=True)  # a job that raised ends the multirun without on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self._close(failed=False)

    def _close(self, failed: bool) -> None:
        if self.parent_run_id is None:
            return
        run_id, self.parent_run_id = self.parent_run_id, None
        atexit.unregister(self._close)
        os.environ.pop(tracking.PARENT_ENV, None)
        mlflow.set_tracking_uri(self.config.tracking.tracking_uri)
        client = MlflowClient()
        try:
            failed = self._summarize(client, client.get_run(run_id)) or failed
        except Exception:  # Hydra would turn it into a warning: say it, and never leave the parent RUNNING
            traceback.print_exc()
            failed = True
        finally:
            client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
            if failed:
                cli.mark_sweep_failed()  # the command exits 2

    def _summarize(self, client: MlflowClient, parent) -> bool:
        """Log the summary, the figure and the best child on the parent and print them; True if a job failed."""
        run_id = parent.info.run_id
        table, points, best = summarize(client, parent)
        failed = "| FAILED |" in table
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sweep_summary.md").write_text(table + "\n")
            client.log_artifact(run_id, str(Path(tmp) / "sweep_summary.md"))
            if points:
                figures.tradeoff_figure(points, Path(tmp) / "tradeoff.png", title=f"{parent.info.run_name}: "
                                        "deploy mIoU against latency (1 thread) and size")
                client.log_artifact(run_id, str(Path(tmp) / "tradeoff.png"))
        lines = [f"\n{parent.info.run_name}: parent run {run_id}" + (", a job FAILED" if failed else ""), table]
        if best is not None:
            shipped = best.data.tags.get("deeplabq.deploy_artifact", "")
            client.log_metric(run_id, "best/deploy_miou", best.data.metrics["deploy/miou"])
            for key, value in {"deeplabq.best_run_id": best.info.run_id, "deeplabq.best_run_name": best.info.run_name,
                               "deeplabq.best_file": f"runs:/{best.info.run_id}/tflite/{shipped}.tflite"}.items():
                client.set_tag(run_id, key, value)
            lines.append(f"best: {best.info.run_name}, deploy/miou {best.data.metrics['deploy/miou']:.2f} %, "
                         f"ships runs:/{best.info.run_id}/tflite/{shipped}.tflite")
        view = mlflow_view.configure_sweep_view(client, parent.info.experiment_id, run_id)
        lines.append(tracking.browse_lines(self.config.tracking.tracking_uri, parent.info.experiment_id, run_id))
        base = tracking.ui_base_url(self.config.tracking.tracking_uri)
        lines.append(f"  this sweep's runs: {mlflow_view.runs_view_url(base, parent.info.experiment_id, view_id=view)}")
        print("\n".join(lines))
        return failed
