"""deeplabq.tracking: params, names and tags of a run, and tracked_run's life cycle in a real sqlite store."""

import json

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from deeplabq import tracking
from deeplabq.tracking import RunNotFoundError

from .conftest import TINY, compose_config, run_id_of


@pytest.fixture
def cfg(tmp_path, mlflow_store, monkeypatch):
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return compose_config(tmp_path, TINY)


def test_flatten_config_dotted_keys_resolved_values_and_json_lists():
    cfg = OmegaConf.create({"train": {"steps": 12, "rate": 0.01, "sizes": [60, 64]}, "name": "x", "none": None,
                            "copy": "${train.steps}", "empty": {}, "long": "a" * 7000})
    flat = tracking.flatten_config(cfg)
    assert flat.pop("long") == "a" * tracking.MAX_PARAM_LENGTH
    assert flat == {"train.steps": "12", "train.rate": "0.01", "train.sizes": "[60, 64]", "name": "x",
                    "none": "None", "copy": "12"}


def test_run_name_puts_mode_and_its_parts_first(tmp_path):
    assert tracking.run_name(compose_config(tmp_path)) == "float-dm0.5-os16-synthetic"
    v3plus = compose_config(tmp_path, ["head=deeplabv3plus", "backbone.output_stride=8", "backbone=mnv2_dm100"])
    assert tracking.run_name(v3plus, ("d100",)) == "float-d100-dm1-os8-v3plus-synthetic"
    assert tracking.run_name(compose_config(tmp_path, ["tracking.run_name=mine"]), ("d100",)) == "mine"


def test_with_run_name_keeps_the_users_choice_and_does_not_change_its_argument(tmp_path):
    cfg = compose_config(tmp_path)
    named = tracking.with_run_name(cfg, "eval-of-x")
    assert named.tracking.run_name == "eval-of-x" and cfg.tracking.run_name is None
    chosen = compose_config(tmp_path, ["tracking.run_name=mine"])
    assert tracking.with_run_name(chosen, "eval-of-x").tracking.run_name == "mine"


def test_group_choices_and_overrides_outside_hydra(tmp_path):
    cfg = compose_config(tmp_path, ["backbone=mnv2_dm100"])
    assert tracking.group_choices(cfg) == {"dataset": "synthetic", "backbone": "mnv2_dm100", "head": "deeplabv3",
                                           "quant": "float", "experiment": "none"}
    assert tracking.command_line_overrides() == []


def test_finished_run_has_params_tags_config_and_run_id_file(tmp_path, cfg):
    out = tmp_path / "run"
    with tracking.tracked_run(cfg, out) as run:
        run_id = run.info.run_id
    assert run_id_of(out) == run_id
    logged = MlflowClient().get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "float-dm0.5-os16-synthetic"
    assert logged.data.params["train.steps"] == "12" and logged.data.params["dataset.image_size"] == "[60, 64]"
    assert logged.data.tags["deeplabq.quant_mode"] == "float" and logged.data.tags["deeplabq.task"] == "train"
    assert "mlflow.parentRunId" not in logged.data.tags
    config = tracking.run_artifact_dir(run_id) / "config.yaml"
    assert OmegaConf.load(config).train.steps == 12
    assert config.parent == tmp_path / "mlartifacts" / run_id / "artifacts"


def test_failing_body_marks_the_run_failed_with_the_error(tmp_path, cfg):
    with pytest.raises(ValueError, match="boom"), tracking.tracked_run(cfg, tmp_path / "run", name="doomed"):
        raise ValueError("boom")
    run = MlflowClient().get_run(run_id_of(tmp_path / "run"))
    assert run.info.status == "FAILED" and run.info.run_name == "doomed"
    assert run.data.tags["deeplabq.error"] == "ValueError: boom"


def test_a_bug_keeps_its_traceback_as_error_log_and_a_user_error_does_not(tmp_path, cfg):
    from deeplabq.errors import ConfigError

    with pytest.raises(KeyError), tracking.tracked_run(cfg, tmp_path / "bug"):
        {}["missing_key"]
    with pytest.raises(ConfigError), tracking.tracked_run(cfg, tmp_path / "user"):
        raise ConfigError("train.steps must be > 0, got 0")
    bug, user = (MlflowClient().get_run(run_id_of(tmp_path / name)) for name in ("bug", "user"))
    assert bug.info.status == user.info.status == "FAILED"
    log = (tracking.run_artifact_dir(bug.info.run_id) / tracking.ERROR_LOG).read_text()
    assert log.startswith("Traceback (most recent call last):") and "KeyError: 'missing_key'" in log
    assert not (tracking.run_artifact_dir(user.info.run_id) / tracking.ERROR_LOG).exists()


def test_resume_continues_the_same_run_and_a_fresh_start_does_not(tmp_path, cfg):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), tracking.tracked_run(cfg, out):
        raise RuntimeError("interrupted")
    first = run_id_of(out)
    with tracking.tracked_run(cfg, out, resume=True) as run:
        assert run.info.run_id == first
    assert MlflowClient().get_run(first).info.status == "FINISHED"
    with tracking.tracked_run(cfg, out) as run:
        assert run.info.run_id != first
    assert run_id_of(out) == run.info.run_id


def test_resume_of_a_run_the_store_does_not_know_is_refused(tmp_path, cfg):
    out = tmp_path / "run"
    out.mkdir()
    (out / tracking.RUN_ID_FILE).write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.raises(RunNotFoundError, match=f"MLflow run '{'0' * 32}' does not exist"):
        with tracking.tracked_run(cfg, out, resume=True):
            pass


def test_child_run_has_its_parent_tag(tmp_path, cfg, monkeypatch):
    with tracking.tracked_run(cfg, tmp_path / "parent") as parent:
        pass
    with tracking.tracked_run(cfg, tmp_path / "child", parent_run_id=parent.info.run_id) as child:
        pass
    assert MlflowClient().get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    monkeypatch.setenv(tracking.PARENT_ENV, parent.info.run_id)  # a sweep's job
    assert tracking.run_tags(cfg)["mlflow.parentRunId"] == parent.info.run_id


def test_check_run_exists_names_the_run_and_the_store(mlflow_store):
    with pytest.raises(RunNotFoundError, match=f"'{'a' * 32}' does not exist in the tracking store {mlflow_store}"):
        tracking.check_run_exists("a" * 32)


def test_browse_lines_for_a_local_store_and_a_server():
    local = tracking.browse_lines("sqlite:////x/mlflow.db", "1", "abc")
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db, then http://127.0.0.1:5000/" in local
    assert "abc" in local
    server = tracking.browse_lines("http://host:5000/", "1", "abc")
    assert "mlflow ui" not in server and "http://host:5000/" in server


def test_a_run_whose_stored_artifact_is_cut_short_ends_failed(tmp_path, cfg):
    """A run is FINISHED only if the store holds every artifact it logged at full size (an upload cut short by a
    server restart would otherwise look complete)."""
    local = tmp_path / "model.tflite"
    local.write_bytes(b"x" * 1000)
    with pytest.raises(tracking.ArtifactStoreError, match=r"tflite/model.tflite \(600 bytes, logged 1000\)"):
        with tracking.tracked_run(cfg, tmp_path / "run") as run:
            tracking.log_artifact(local, "tflite")
            stored = tracking.run_artifact_dir(run.info.run_id) / "tflite" / "model.tflite"
            stored.write_bytes(b"x" * 600)  # what an upload cut short leaves
    logged = MlflowClient().get_run(run.info.run_id)
    assert logged.info.status == "FAILED"
    assert "does not hold 1 of the 2 artifacts this run logged" in logged.data.tags["deeplabq.error"]
    with tracking.tracked_run(cfg, tmp_path / "whole") as run:  # config.yaml and a whole file: FINISHED
        tracking.log_artifact(local, "tflite")
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
