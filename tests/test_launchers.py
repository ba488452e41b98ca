"""The same sweep with Hydra's basic, joblib and submitit launchers (conf/hydra/launcher/slurm_local.yaml: the SLURM
config's jobs in submitit's local mode) makes the same MLflow parent and child runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT, TINY

pytestmark = pytest.mark.slow

LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
             "submitit": ["hydra/launcher=slurm_local"]}
# What differs by nature between two sweeps: ids, processes, folders.
VOLATILE_TAGS = {"deeplabq.pid", "deeplabq.pid_start", "mlflow.parentRunId", "deeplabq.best_run_id",
                 "deeplabq.best_file"}
VOLATILE_PARAMS = {"paths.output_dir", "tracking.experiment_name"}


def shape(client: MlflowClient, run) -> dict:
    """A run as the UI and a summary see it, without what differs by nature (ids, pids, folders)."""
    return {"name": run.info.run_name, "status": run.info.status,
            "params": {k: v for k, v in run.data.params.items() if k not in VOLATILE_PARAMS},
            "tags": {k: v for k, v in run.data.tags.items() if k not in VOLATILE_TAGS},
            "metrics": sorted(run.data.metrics),
            "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id))}


def test_basic_joblib_and_submitit_sweeps_make_the_same_runs(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPLABQ_", "MLFLOW_", "PYTEST_"))}
    sweeps = {}
    for launcher, overrides in LAUNCHERS.items():
        done = subprocess.run([sys.executable, "train.py", "-m", *overrides, "seed=0,1", *TINY,
                               f"tracking.tracking_uri={store}", f"tracking.artifact_location={tmp_path / 'art'}",
                               f"tracking.experiment_name={launcher}", f"hydra.sweep.dir={tmp_path / launcher}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{launcher}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        client = MlflowClient(store)
        runs = client.search_runs([client.get_experiment_by_name(launcher).experiment_id],
                                  order_by=["params.seed ASC"])
        (parent,) = [r for r in runs if r.data.tags.get("deeplabq.sweep") == "parent"]
        children = [r for r in runs if r is not parent]
        assert len(children) == 2 and all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
        assert {c.data.params["paths.output_dir"] for c in children} == \
            {str(tmp_path / launcher / "0"), str(tmp_path / launcher / "1")}
        best = max(children, key=lambda c: c.data.metrics["deploy/miou"])
        assert parent.data.tags["deeplabq.best_run_id"] == best.info.run_id
        assert children[0].data.tags["mlflow.source.name"] == "train.py"  # not the launcher's worker
        sweeps[launcher] = {"parent": shape(client, parent), "children": [shape(client, c) for c in children]}
    for launcher in ("joblib", "submitit"):
        for key in ("parent", "children"):
            basic, other = sweeps["basic"][key], sweeps[launcher][key]
            for a, b in zip([basic] if key == "parent" else basic, [other] if key == "parent" else other, strict=True):
                assert a == b, (launcher, key)
