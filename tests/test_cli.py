"""The entry points as a user runs them (subprocesses): exit codes, messages, MLflow runs, sweeps."""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT, TINY, make_bad_folder_dataset, only_run, tiny_folder_overrides

TINY_EVAL = [o for o in TINY if not o.startswith("train.")]  # evaluate.py / convert.py have no train group

pytestmark = pytest.mark.slow


def run_cli(script: str, tmp_path, *overrides, expect: int = 0, output: str = "run"):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    multirun = "-m" in overrides
    overrides = [o for o in overrides if o != "-m"]
    args = [sys.executable, str(ROOT / script), *(["-m"] if multirun else []), f"tracking.tracking_uri={store}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}", *overrides,
            f"hydra.sweep.dir={tmp_path / 'sweep'}" if multirun else f"hydra.run.dir={tmp_path / output}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def test_impossible_value_exits_2_with_the_key_and_fails_the_run(tmp_path):
    done = run_cli("train.py", tmp_path, *TINY, "backbone.output_stride=12", expect=2)
    assert "deeplabq: error: backbone.output_stride must be one of (8, 16, 32), got 12" in done.stderr
    assert "Traceback" not in done.stderr
    only_run(tmp_path, status="FAILED")


def test_bad_dataset_files_are_all_named_in_one_error_before_training(tmp_path, mlflow_store):
    bad = make_bad_folder_dataset(tmp_path / "data")
    done = run_cli("train.py", tmp_path, *tiny_folder_overrides(tmp_path / "data"), expect=2)
    lines = done.stderr.splitlines()
    assert [line for line in lines if "deeplabq: error:" in line] == [lines[0]], done.stderr[-3000:]
    assert lines[0].startswith(f"deeplabq: error: 3 bad files in folder val: first: {bad['out_of_range']}: ")
    assert all(str(path) in done.stderr for path in bad.values()) and "Traceback" not in done.stderr
    only_run(tmp_path, status="FAILED")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_key_is_refused(tmp_path):
    done = run_cli("train.py", tmp_path, *TINY, "train.stepz=5", expect=1)
    assert "stepz" in done.stderr


def test_evaluate_refuses_a_truncated_tflite_file(tmp_path):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"TFL3" + b"\0" * 100)
    done = run_cli("evaluate.py", tmp_path, *TINY_EVAL, f"source={broken}", expect=2)
    assert "broken.tflite is not a loadable TFLite model" in done.stderr
    only_run(tmp_path, status="FAILED")


def test_evaluate_refuses_an_unknown_run_id(tmp_path):
    done = run_cli("evaluate.py", tmp_path, *TINY_EVAL, "source=0123456789abcdef0123456789abcdef", expect=2)
    assert "MLflow run '0123456789abcdef0123456789abcdef' does not exist" in done.stderr


def test_a_sweep_with_failed_jobs_ends_with_its_parent_failed(tmp_path):
    done = run_cli("train.py", tmp_path, "-m", *TINY, "backbone.output_stride=12,7")
    assert done.stderr.count("deeplabq: error: backbone.output_stride must be one of") == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("deeplabq.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FAILED" and parent.info.run_name == "sweep backbone.output_stride=12,7"
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED"]
    assert "a job FAILED" in done.stdout


def test_only_user_errors_become_one_line_with_exit_2(tmp_path, capsys):
    """run_task: a deeplabq UserError prints one line and exits 2; anything else is a bug and propagates
    with its traceback (Hydra prints it and exits 1)."""
    from omegaconf import OmegaConf

    from deeplabq.cli import run_task
    from deeplabq.errors import InputNotFoundError

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})

    def missing_file(cfg, output_dir):
        raise InputNotFoundError("TFLite file /no/such.tflite does not exist")

    def bug(cfg, output_dir):
        return {}["deploy/miou"]

    with pytest.raises(SystemExit) as exited:
        run_task(missing_file, cfg)
    assert exited.value.code == 2
    assert capsys.readouterr().err == "deeplabq: error: TFLite file /no/such.tflite does not exist\n"
    with pytest.raises(KeyError):
        run_task(bug, cfg)
    with pytest.raises(ValueError):  # a plain ValueError is a bug too, not a user error
        run_task(lambda cfg, out: int("not a number"), cfg)
