"""The entry points as a user runs them (subprocesses): bad input gives exit 2, one line, a FAILED run and nothing
half-written that looks complete."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT, TINY, fresh_store, make_bad_folder_dataset, tiny_folder_overrides

TINY_EVAL = [o for o in TINY if not o.startswith("train.")]  # evaluate.py / convert.py have no train group

pytestmark = pytest.mark.slow


def run_cli(script: str, tmp_path, *overrides, expect: int = 0, output: str = "run"):
    store = f"sqlite:///{fresh_store(tmp_path / 'mlflow.db')}"
    multirun = "-m" in overrides
    overrides = [o for o in overrides if o != "-m"]
    args = [sys.executable, str(ROOT / script), *(["-m"] if multirun else []), f"tracking.tracking_uri={store}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}", *overrides,
            # a multirun keeps its configured sweep dir (its interpolations are what broke once), under tmp_path
            f"paths.root_dir={tmp_path}" if multirun else f"hydra.run.dir={tmp_path / output}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@dataclass
class BadInput:
    """A command given something wrong, and what it must say."""

    script: str
    overrides: list[str]
    says: str  # the start of the one error line, after "deeplabq: error: "
    statuses: list[str] = field(default_factory=lambda: ["FAILED"])  # of every run in the store but a sweep's parent
    also_says: list[str] = field(default_factory=list)  # further text of that line or of the details after it


def bad_input(case: str, tmp_path: Path, float_run) -> BadInput:
    if case == "impossible_value":
        return BadInput("train.py", [*TINY, "backbone.output_stride=12"],
                        "backbone.output_stride must be one of (8, 16, 32), got 12")
    if case == "missing_root":
        missing = tmp_path / "no_such_camvid"
        return BadInput("train.py", [*(o for o in TINY if not o.startswith("dataset")), "dataset=camvid",
                                     f"dataset.root={missing}"], f"dataset.root {missing} does not exist")
    if case == "corrupt_image":
        bad = make_bad_folder_dataset(tmp_path / "data")
        return BadInput("train.py", tiny_folder_overrides(tmp_path / "data"),
                        f"3 bad files in folder val: first: {bad['out_of_range']}: ",
                        also_says=[str(path) for path in bad.values()])
    if case == "checkpoint_mismatch":
        return BadInput("train.py", [*TINY, "quant=ptq", "backbone=mnv2_dm100",
                                     f"quant.float_checkpoint={float_run.path}"],
                        "quant.float_checkpoint=checkpoint ",  # a run folder outside this store: no run config
                        also_says=["hint: the run's model was built with another architecture"])
    if case == "export_fails":
        return BadInput("train.py", [*TINY, "quant=ptq", "quant.scheme=int8",
                                     f"quant.float_checkpoint={float_run.path}", "export.int8_debug_images=0",
                                     "export.int8_float_layers=[Conv1,Conv9]"],
                        "TFLite variant 'int8' failed: ", also_says=["no op of layer(s) ['Conv9']"])
    if case == "truncated_tflite":
        broken = tmp_path / "broken.tflite"
        broken.write_bytes(b"TFL3" + b"\0" * 100)
        return BadInput("evaluate.py", [*TINY_EVAL, f"source={broken}"], "broken.tflite is not a loadable TFLite model")
    if case == "unknown_run_id":
        return BadInput("evaluate.py", [*TINY_EVAL, "source=0123456789abcdef0123456789abcdef"],
                        "MLflow run '0123456789abcdef0123456789abcdef' does not exist", statuses=[])
    if case == "failed_multirun_job":  # PTQ needs no training: one job finishes, the other's checkpoint is missing
        return BadInput("train.py", ["-m", *TINY, "quant=ptq", "quant.scheme=dynamic_range",
                                     f"quant.float_checkpoint={float_run.path},{tmp_path / 'no_such_run'}"],
                        "quant.float_checkpoint=", also_says=["no_such_run"], statuses=["FAILED", "FINISHED"])
    raise AssertionError(case)


CASES = ["impossible_value", "missing_root", "corrupt_image", "checkpoint_mismatch", "export_fails",
         "truncated_tflite", "unknown_run_id", "failed_multirun_job"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_a_failed_run_and_nothing_half_written(tmp_path, tiny_float_run, case):
    given = bad_input(case, tmp_path, tiny_float_run)
    done = run_cli(given.script, tmp_path, *given.overrides, expect=2)
    errors = [line for line in done.stderr.splitlines() if "deeplabq: error:" in line]
    assert len(errors) == 1, done.stderr[-3000:]  # one line, for the one job that failed
    assert errors[0].startswith(f"deeplabq: error: {given.says}"), errors[0]
    assert all(text in done.stderr for text in given.also_says), done.stderr[-3000:]  # the line, or details below
    assert "Traceback" not in done.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("deeplabq.sweep") == "parent"]
    jobs = [r for r in runs if r not in parents]
    assert sorted(r.info.status for r in jobs) == given.statuses
    if parents:  # a sweep with a failed job ends FAILED, and says so
        assert [p.info.status for p in parents] == ["FAILED"] and "a job FAILED" in done.stdout
    for job in jobs:
        if job.info.status == "FAILED":
            assert given.says in job.data.tags["deeplabq.error"]
            # Nothing that looks complete: no metrics.json, no checkpoint of a job that failed before training,
            # no partial file, no file of the variant that failed.
            folder = next(p.parent for p in tmp_path.rglob("mlflow_run.json") if job.info.run_id in p.read_text())
            assert not (folder / "metrics.json").exists()
            assert not list(folder.rglob("*.partial"))
            assert not (folder / "checkpoints").exists()
            assert not (folder / "tflite" / "int8.tflite").exists()
            if case == "export_fails":  # the variants that did convert are kept
                assert (folder / "tflite" / "float.tflite").is_file()


def test_unknown_config_key_is_refused(tmp_path):
    done = run_cli("train.py", tmp_path, *TINY, "train.stepz=5", expect=1)
    assert "stepz" in done.stderr


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
