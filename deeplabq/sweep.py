"""Hydra callback: a multirun becomes one MLflow parent run with a child run per job and a summary table.

Registered in conf/hydra/default.yaml. The parent's id reaches each job through DEEPLABQ_PARENT_RUN_ID,
which deeplabq.tracking turns into the ``mlflow.parentRunId`` tag (the MLflow UI nests children under it).
Works for in-process launchers (basic) and for process launchers that inherit the environment (joblib).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from deeplabq import tracking

PARENT_ENV = "DEEPLABQ_PARENT_RUN_ID"
SUMMARY_METRICS = ("miou", "size_bytes", "latency_ms_t1", "latency_ms_t2")


def children_summary(parent_run_id: str) -> str:
    """Markdown table of the child runs: one row per job, one column group per artifact."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    rows = []
    for child in children:
        metrics = child.data.metrics
        artifacts = sorted({k.split("/")[0] for k in metrics if k.endswith("/size_bytes")})
        cells = []
        for artifact in artifacts:
            values = [metrics.get(f"{artifact}/{m}") for m in SUMMARY_METRICS]
            shown = [f"{100 * values[0]:.2f}" if values[0] is not None else "-",
                     f"{values[1] / 1024:.0f} KB" if values[1] is not None else "-",
                     *[f"{v:.1f} ms" if v is not None else "-" for v in values[2:]]]
            cells.append(f"{artifact}: mIoU {shown[0]}, {shown[1]}, {shown[2]} (1t) / {shown[3]} (2t)")
        rows.append(f"| {child.info.run_name} | {child.info.status} | {'<br>'.join(cells) or '-'} |")
    header = "| job | status | artifacts (mIoU, size, latency) |\n|---|---|---|"
    return "\n".join([header, *rows])


class MlflowSweepCallback(Callback):
    def __init__(self) -> None:
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        experiment_id = tracking.setup_mlflow(config.tracking)
        overrides = " ".join(config.hydra.overrides.task)
        run = MlflowClient().create_run(
            experiment_id, run_name=f"sweep {overrides}"[:250],
            tags={"deeplabq.sweep": "parent", "deeplabq.sweep_overrides": overrides},
        )
        self.parent_run_id = run.info.run_id
        os.environ[PARENT_ENV] = self.parent_run_id

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.parent_run_id is None:
            return
        client = MlflowClient()
        summary = children_summary(self.parent_run_id)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "sweep_summary.md"
            path.write_text(summary + "\n")
            client.log_artifact(self.parent_run_id, str(path))
        failed = "| FAILED |" in summary
        client.set_terminated(self.parent_run_id, status="FAILED" if failed else "FINISHED")
        os.environ.pop(PARENT_ENV, None)
        print(f"\nsweep parent run {self.parent_run_id}:\n{summary}")
        mlflow.set_tracking_uri(config.tracking.tracking_uri)
