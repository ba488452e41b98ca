"""Stale and interrupted runs (runs.py): mark the runs of dead processes KILLED, then list every KILLED, FAILED
or RUNNING run with its process, its folder and, for a training run with a checkpoint, the command that resumes
it into the same MLflow run."""

from __future__ import annotations

import shlex
from datetime import datetime
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from deeplabq import tracking
from deeplabq.errors import UserError

LISTED = ("KILLED", "FAILED", "RUNNING")


def _shown(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when inside it (as the README's commands write folders), else absolute."""
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def output_folder(run) -> Path | None:
    folder = run.data.params.get("paths.output_dir")
    return Path(folder) if folder else None


def resume_command(run, cwd: Path) -> str | None:
    """``python train.py <the run's own overrides> resume=true hydra.run.dir=<folder>`` for a KILLED or FAILED
    training run whose folder holds a checkpoint; None for any other run."""
    folder = output_folder(run)
    if (run.info.status not in ("KILLED", "FAILED") or run.data.tags.get("deeplabq.task") != "train"
            or folder is None or not (folder / tracking.CHECKPOINT_DIR / "checkpoint").is_file()):
        return None
    typed = folder / ".hydra" / "overrides.yaml"  # what the job was started with (Hydra writes it)
    overrides = [o for o in (yaml.safe_load(typed.read_text()) or []) if not o.startswith("resume=")] \
        if typed.is_file() else []
    train_py = Path(run.data.params.get("paths.root_dir", cwd)) / "train.py"
    return shlex.join(["python", _shown(train_py, cwd), *overrides, "resume=true",
                       f"hydra.run.dir={_shown(folder, cwd)}"])


def _row(run, cwd: Path) -> list[str]:
    tags, folder = run.data.tags, output_folder(run)
    started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
    process = f"{tags[tracking.HOST_TAG]}/{tags[tracking.PID_TAG]}" if tracking.PID_TAG in tags else "–"
    return [run.info.run_name, run.info.status, started, process, _shown(folder, cwd) if folder else "–"]


def report(tracking_uri: str, experiment_name: str, cwd: Path | None = None) -> str:
    """Mark the dead runs of the experiment KILLED, then the table of its KILLED, FAILED and RUNNING runs
    (newest first), each followed by its error and its resume command when it has them."""
    cwd = (cwd or Path.cwd()).resolve()
    if tracking_uri.startswith("sqlite:///"):  # MLflow would create an empty store there
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise UserError(f"--tracking-uri: there is no MLflow store at {path}")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise UserError(f"--experiment: the store {tracking_uri} has no experiment {experiment_name!r}")
    lines = tracking.mark_dead_runs(client, [experiment.experiment_id])
    runs = [r for r in client.search_runs([experiment.experiment_id], "attributes.status != 'FINISHED'",
                                          order_by=["attributes.start_time DESC"], max_results=1000)
            if r.info.status in LISTED]  # a list is searchable for run ids only
    if not runs:
        return "\n".join([*lines, f"no KILLED, FAILED or RUNNING run in experiment {experiment_name} of "
                                   f"{tracking_uri}"])
    rows = [["run", "status", "started", "host/pid", "output folder"], *(_row(r, cwd) for r in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    table = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
             for row in rows]
    lines.append(table[0])
    for run, line in zip(runs, table[1:], strict=True):
        lines.append(line)
        if tracking.ERROR_TAG in run.data.tags:
            lines.append(f"    why: {run.data.tags[tracking.ERROR_TAG].splitlines()[0][:200]}")
        command = resume_command(run, cwd)
        if command:
            lines.append(f"    resume: {command}")
    return "\n".join(lines)
