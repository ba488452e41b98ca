"""Every command the README shows, run as written in a copy of the repository, plus `smoke=tiny` at most.

The copy (conf, package, entry points, the venv linked in, ../shared linked beside it) gets its own
outputs/, multirun/ and mlflow.db, exactly where a user's commands would put them. Commands run in README
order, in `bash` with the venv activated, as a user following the README would type them; placeholders such
as `<time>` or `<MLflow run id>` are filled with what the main job made. Each test then checks what the
command is for, not only its exit status.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from .conftest import ROOT

pytestmark = pytest.mark.slow

SMOKE = "smoke=tiny"
SHARED = ROOT.parent / "shared"
CAMVID = SHARED / "data" / "camvid"
PASCAL = SHARED / "checkpoints" / "deeplabv3_mnv2_dm05_pascal"
COPIED = ("conf", "deeplabq", "benchmarks", "train.py", "evaluate.py", "convert.py", "compare.py", "runs.py",
          "register.py", "predict.py", "dev.sh", "pyproject.toml", "README.md")
# Run by CI itself (.ci/run), not from inside the suite it starts.
NOT_HERE = {"bash dev.sh test"}


def readme_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The command lines of the README's ```bash blocks (continuations joined, trailing comments cut)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


class Sandbox:
    """A copy of the repository where README commands run, and what they made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filled: dict[str, str] = {}
        # a user's shell: none of the variables deeplabq, MLflow or pytest set in this process
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPLABQ_", "MLFLOW_", "PYTEST_"))}

    def fill(self, command: str) -> str:
        typed = command
        for placeholder, value in self.filled.items():
            typed = typed.replace(placeholder, value)
        assert "<" not in typed, f"unfilled placeholder in {typed}"
        return typed

    def run(self, command: str, *, smoke: bool = True, expect: int = 0, timeout: int = 900, env=None):
        line = f"source .venv/bin/activate && {self.fill(command)}" + (f" {SMOKE}" if smoke else "")
        done = subprocess.run(["bash", "-c", line], cwd=self.root, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        assert expect is None or done.returncode == expect, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    def start(self, command: str, *, smoke: bool = False, env=None, stdout=subprocess.DEVNULL) -> subprocess.Popen:
        """A long-running command (a server, a background worker), in its own process group."""
        line = f"source .venv/bin/activate && {self.fill(command)}" + (f" {SMOKE}" if smoke else "")
        return subprocess.Popen(["bash", "-c", line], cwd=self.root,
                                env={**self.env, **(env or {})}, stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")

    def runs(self, **tags) -> list:
        client = self.client
        found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   order_by=["attributes.start_time ASC"])
        return [r for r in found if all(r.data.tags.get(k.replace("__", ".")) == v for k, v in tags.items())]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    return make_sandbox(tmp_path_factory)


def make_sandbox(tmp_path_factory) -> Sandbox:
    base = tmp_path_factory.mktemp("readme")
    root = base / "main"
    root.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(ROOT / ".venv")
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED)
    return Sandbox(root)


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not here")


def commands_run_here() -> set[str]:
    """The first argument of every ``sandbox.run("...")`` and ``sandbox.start("...")`` in this file and in
    test_readme_scaling.py (the README's "Scaling out" commands, in a sandbox of their own: another worker)."""
    files = (Path(__file__), Path(__file__).with_name("test_readme_scaling.py"))
    calls = [node for file in files for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr in ("run", "start") and node.args
             and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]
    return {call.args[0].value for call in calls}


def test_the_readme_shows_only_commands_this_file_runs():
    assert set(readme_commands()) == commands_run_here() | NOT_HERE


def test_main_job(sandbox):
    done = sandbox.run("bash dev.sh train")
    (run,) = sandbox.runs()
    assert run.info.status == "FINISHED" and run.info.run_name == "float-dm0.5-os16-synthetic"
    metrics = run.data.metrics
    for key in ("deploy/miou", "deploy/pixel_accuracy", "deploy/size_bytes", "deploy/latency_ms_t1",
                "deploy/latency_ms_t2", "deploy/delta_miou", "int8/miou", "float16/miou", "dynamic_range/miou"):
        assert key in metrics, key
    assert metrics["deploy/miou"] == metrics["float/miou"] and 0 <= metrics["deploy/miou"] <= 100
    assert run.data.tags["deeplabq.deploy_file"] == "tflite/float.tflite"
    figures = {a.path for a in sandbox.client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/per_class_iou.png", "figures/confusion_matrix.png", "figures/samples.png"}
    assert "* shipped: tflite/float.tflite" in done.stdout and "Traceback" not in done.stderr
    # a quiet console: no TensorFlow/absl/LiteRT log lines
    assert not re.search(r"^(I|W|E)0000|absl|XNNPACK delegate|oneDNN", done.stdout + done.stderr, flags=re.M)
    (run_dir,) = (sandbox.root / "outputs" / "synthetic" / "float").iterdir()
    sandbox.filled.update({"<time>": run_dir.name, "<MLflow run id>": run.info.run_id,
                           "<float run dir or MLflow run id>": str(run_dir.relative_to(sandbox.root)),
                           "<float run>": str(run_dir.relative_to(sandbox.root))})
    sandbox.main_run = run


def test_overrides_of_backbone_stride_and_head(sandbox):
    sandbox.run("python train.py backbone=mnv2_dm100 backbone.output_stride=8 head=deeplabv3plus")
    run = sandbox.runs()[-1]
    assert run.info.run_name == "float-dm1-os8-v3plus-synthetic" and run.info.status == "FINISHED"


def test_delayed_qat(sandbox):
    sandbox.run("python train.py quant=qat_delayed quant.delay_steps=200")
    run = sandbox.runs()[-1]
    assert run.info.status == "FINISHED" and run.info.run_name == "qat_delayed-d200-dm0.5-os16-synthetic"
    assert run.data.tags["deeplabq.deploy_artifact"] == "qat_int8" and run.data.tags["deeplabq.quant_delay"] == "200"
    started = sandbox.client.get_metric_history(run.info.run_id, "quantization_started")
    assert [m.step for m in started] == [200]  # fake quantization switched on at the delay, once
    m = run.data.metrics
    for key in ("qat_int8/miou", "qat_int8/size_bytes", "qat_int8/latency_ms_t1", "qat_int8/agreement"):
        assert key in m, key
    assert "deploy/delta_miou" not in m  # no float model survives (learning and bars: tests/test_learning.py)
    assert "tflite/qat_int8.tflite" in {a.path for a in sandbox.client.list_artifacts(run.info.run_id, "tflite")}


def test_qat_finetune_from_the_main_run(sandbox):
    sandbox.run("python train.py quant=qat_finetune quant.float_checkpoint=<float run dir or MLflow run id>")
    run = sandbox.runs()[-1]
    assert run.info.status == "FINISHED" and run.data.params["train.learning_rate"] == "3e-05"
    assert run.data.tags["deeplabq.deploy_artifact"] == "qat_int8"
    assert run.data.tags["deeplabq.float_checkpoint"].startswith("checkpoint")
    m = run.data.metrics
    assert m["deploy/delta_miou"] == pytest.approx(m["qat_int8/miou"] - m["keras_float/miou"])
    assert m["qat_int8/agreement"] > 0.5


def test_ptq_from_the_main_run(sandbox):
    sandbox.run("python train.py quant=ptq quant.scheme=int8 quant.float_checkpoint=<float run dir or MLflow run id> "
                "quant.calibration_samples=64")
    run = sandbox.runs()[-1]
    assert run.info.run_name.startswith("ptq-int8-") and run.data.tags["deeplabq.deploy_artifact"] == "int8"
    assert run.data.metrics["deploy/delta_miou"] == pytest.approx(
        run.data.metrics["int8/miou"] - run.data.metrics["float/miou"])


@needs(PASCAL)
def test_fine_tune_from_the_model_zoo_checkpoint(sandbox):
    sandbox.run("python train.py init.source=deeplab_checkpoint init.path=../shared/checkpoints/"
                "deeplabv3_mnv2_dm05_pascal/model.ckpt init.initialize_last_layer=false")
    assert sandbox.runs()[-1].data.tags["deeplabq.init"].startswith("deeplab_checkpoint:")


def test_resume_continues_the_same_run(sandbox):
    before = len(sandbox.runs())
    sandbox.run("python train.py resume=true hydra.run.dir=outputs/synthetic/float/<time>")
    assert len(sandbox.runs()) == before  # the main job's run, not a new one
    sandbox.main_run = sandbox.client.get_run(sandbox.main_run.info.run_id)
    assert sandbox.main_run.info.status == "FINISHED"


def assert_sweep(sandbox, jobs: int, done) -> None:
    (parent,) = [r for r in sandbox.runs(deeplabq__sweep="parent") if r.info.run_id not in sandbox.filled.values()]
    sandbox.filled[f"sweep{len(sandbox.filled)}"] = parent.info.run_id
    children = sandbox.runs(mlflow__parentRunId=parent.info.run_id)
    assert parent.info.status == "FINISHED" and len(children) == jobs
    assert all(c.info.status == "FINISHED" and "deploy/miou" in c.data.metrics for c in children)
    assert len(parent.info.run_name) < 80 and "tracking" not in parent.info.run_name
    best = max(children, key=lambda c: c.data.metrics["deploy/miou"])
    assert parent.data.tags["deeplabq.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/deploy_miou"] == best.data.metrics["deploy/miou"]
    assert {a.path for a in sandbox.client.list_artifacts(parent.info.run_id)} >= {"sweep_summary.md", "tradeoff.png"}
    assert f"best: {best.info.run_name}" in done.stdout


def test_delay_sweep(sandbox):
    done = sandbox.run("python train.py -m quant=qat_delayed quant.delay_steps=0,100,200")
    assert_sweep(sandbox, 3, done)
    parent = sandbox.runs(deeplabq__sweep="parent")[-1]
    assert parent.info.run_name == "sweep quant.delay_steps=0,100,200"
    assert parent.data.params["quant.delay_steps"] == "0,100,200" and parent.data.params["quant"] == "qat_delayed"


def test_parallel_float_and_qat_sweep_with_joblib(sandbox):
    done = sandbox.run("python train.py -m hydra/launcher=joblib hydra.launcher.n_jobs=2 quant=float,qat_delayed "
                       "quant.delay_steps=100")
    assert_sweep(sandbox, 2, done)
    parent = sandbox.runs(deeplabq__sweep="parent")[-1]
    children = sandbox.runs(mlflow__parentRunId=parent.info.run_id)
    assert sorted(c.data.tags["deeplabq.quant_mode"] for c in children) == ["float", "qat_delayed"]
    assert len({c.data.tags["deeplabq.pid"] for c in children}) == 2  # joblib ran them in two processes
    summary = sandbox.client.download_artifacts(parent.info.run_id, "sweep_summary.md")
    qat_row = next(line for line in Path(summary).read_text().splitlines() if "| qat_delayed |" in line)
    assert "| +" in qat_row or "| -" in qat_row  # a delta against the sweep's float run


def test_convert_keeping_the_worst_layers_float(sandbox):
    sandbox.run("python convert.py source=<float run> 'variants=[int8]' export.int8_float_worst_layers=3")
    run = sandbox.runs(deeplabq__task="convert")[-1]
    assert run.data.tags["mlflow.parentRunId"] == sandbox.main_run.info.run_id
    assert run.data.metrics["int8/float_layers"] == 3 and "deploy/miou" in run.data.metrics


def test_convert_with_an_int8_accuracy_budget(sandbox):
    # On the smoke-size model the budget may or may not be reachable: either way the curve is logged, and a
    # budget it cannot meet fails the int8 variant naming it (exit 2).
    done = sandbox.run("python convert.py source=<float run> 'variants=[int8]' export.per_channel=false "
                       "export.int8_max_drop=0.3", expect=None)
    run = sandbox.runs(deeplabq__task="convert")[-1]
    artifacts = {a.path for a in sandbox.client.list_artifacts(run.info.run_id, "tflite")}
    assert "tflite/int8_accuracy_control.csv" in artifacts
    if done.returncode == 0:
        assert "deeplabq.int8_control" in run.data.tags and "int8_control/miou" in run.data.metrics
    else:
        assert done.returncode == 2 and "export.int8_max_drop=0.3 cannot be met" in done.stdout + done.stderr


def test_convert_with_corrections_and_16x8(sandbox):
    done = sandbox.run("python convert.py source=<float run> 'variants=[int8,int16x8]' "
                       "export.cross_layer_equalization=true export.bias_correction=true")
    run = sandbox.runs(deeplabq__task="convert")[-1]
    assert run.data.params["export.cross_layer_equalization"] == "True"
    assert run.data.metrics["int16x8/xnnpack_partitions"] == 0 and "int16x8/miou" in run.data.metrics
    assert "int16x8 * †" in done.stdout


def test_evaluate_a_tflite_file_of_a_run(sandbox):
    done = sandbox.run("python evaluate.py source=outputs/synthetic/float/<time>/tflite/int8.tflite "
                       "eval.profile_ops=true")
    run = sandbox.runs(deeplabq__task="evaluate")[-1]
    assert run.data.tags["mlflow.parentRunId"] == sandbox.main_run.info.run_id  # found from the file's folder
    # the same file on the same images (the run's config) scores what training measured
    assert run.data.metrics["deploy/miou"] == pytest.approx(sandbox.main_run.data.metrics["int8/miou"])
    assert f"mIoU {run.data.metrics['deploy/miou']:.2f} %" in done.stdout
    # the per-op profile: every op type of the file timed, the slowest printed, the table logged
    assert {"int8/op_ms/CONV_2D", "int8/op_ms/ARG_MAX", "int8/op_ms/DEQUANTIZE"} <= set(run.data.metrics)
    assert "by op type: " in done.stdout and "sum of ops" in done.stdout
    assert "op_profile.csv" in [a.path for a in sandbox.client.list_artifacts(run.info.run_id)]


def test_evaluate_a_run_folder(sandbox):
    sandbox.run("python evaluate.py source=outputs/synthetic/float/<time>")
    run = sandbox.runs(deeplabq__task="evaluate")[-1]
    assert run.data.tags["mlflow.parentRunId"] == sandbox.main_run.info.run_id
    assert run.data.metrics["deploy/miou"] == pytest.approx(sandbox.main_run.data.metrics["keras/miou"])


def test_evaluate_a_run_id(sandbox):
    sandbox.run("python evaluate.py source=<MLflow run id> eval.split=val")
    run = sandbox.runs(deeplabq__task="evaluate")[-1]
    assert run.data.metrics["deploy/miou"] == pytest.approx(sandbox.main_run.data.metrics["keras/miou"])


def test_register_the_shipped_file_then_evaluate_and_load_it_by_alias(sandbox):
    main = sandbox.client.get_run(sandbox.main_run.info.run_id)
    done = sandbox.run("python register.py <MLflow run id> --name deeplabq-synthetic --alias mobile", smoke=False)
    assert "registered deeplabq-synthetic version 1: models:/deeplabq-synthetic@mobile" in done.stdout
    version = sandbox.client.get_model_version_by_alias("deeplabq-synthetic", "mobile")
    shipped = main.data.tags["deeplabq.deploy_artifact"]
    assert version.tags["artifact"] == shipped and version.tags["source_run"] == main.info.run_id
    assert float(version.tags["miou"]) == pytest.approx(main.data.metrics["deploy/miou"], abs=1e-4)
    assert version.tags["quant_mode"] == "float"
    assert version.tags["cpu_features"] == main.data.tags["deeplabq.cpu_features"]
    after = sandbox.client.get_run(main.info.run_id).data  # the source run's record is untouched
    assert (after.metrics, after.params, after.tags) == (main.data.metrics, main.data.params, main.data.tags)

    sandbox.run("python evaluate.py source=models:/deeplabq-synthetic@mobile")
    evaluated = sandbox.runs(deeplabq__task="evaluate")[-1]
    assert evaluated.data.tags["mlflow.parentRunId"] == main.info.run_id
    assert evaluated.data.metrics["deploy/miou"] == pytest.approx(main.data.metrics["deploy/miou"])

    # The README's Python snippet, as written, in a fresh process, on a photo of another size than the model's.
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
                   if "pyfunc.load_model" in b)
    photo = np.random.default_rng(3).integers(0, 256, (37, 90, 3), dtype=np.uint8)
    Image.fromarray(photo).save(sandbox.root / "photo.png")
    python = str(sandbox.root / ".venv" / "bin" / "python")
    done = subprocess.run([python, "-c", snippet + "\nprint(labels.shape, labels.max())"], cwd=sandbox.root,
                          env=sandbox.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shape, top = done.stdout.strip().rsplit(") ", 1)
    assert shape + ")" == "(37, 90)" and 0 <= int(top) < 5


def test_an_unknown_registered_model_is_one_clear_error(sandbox):
    wrong = subprocess.run(["bash", "-c", "source .venv/bin/activate && python evaluate.py "
                            "source=models:/deeplabq-synthetic@nosuchalias smoke=tiny"],
                           cwd=sandbox.root, env=sandbox.env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert wrong.stderr.strip().splitlines()[-1].startswith("deeplabq: error: models:/deeplabq-synthetic@nosuchalias "
                                                             "is not in the model registry")


def test_predict_labels_a_folder_of_images(sandbox, tmp_path):
    from deeplabq import data as data_lib
    from deeplabq.segmenter import Segmenter

    from .conftest import compose_config

    cfg = compose_config(tmp_path, ["smoke=tiny"], config_name="predict")
    split = data_lib.open_split(cfg.dataset, "val")
    folder = sandbox.root / "my_images"
    folder.mkdir()
    images = {f"scene{i}": split.load(i)[0][: 40 + 8 * i, : 64 - 6 * i] for i in range(3)}  # three sizes
    for stem, image in images.items():
        Image.fromarray(image).save(folder / f"{stem}.png")
    sandbox.filled["<folder of images>"] = "my_images"
    done = sandbox.run("python predict.py source=outputs/synthetic/float/<time>/tflite/int8.tflite "
                       "input=<folder of images>")
    out = Path(re.search(r"3 label maps in (\S+) \(", done.stdout).group(1))
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.png" for stem in images]
    tflite = sandbox.root / "outputs" / "synthetic" / "float" / sandbox.filled["<time>"] / "tflite" / "int8.tflite"
    segmenter = Segmenter.from_source(str(tflite), cfg)  # in-process: the same labels as the command wrote
    for stem, image in images.items():
        with Image.open(out / f"{stem}.png") as png:
            assert png.mode == "P" and png.size == (image.shape[1], image.shape[0])
            np.testing.assert_array_equal(np.asarray(png), segmenter.segment(image))
    assert "images/s" in done.stdout


def test_convert_a_run_id_never_overwrites_it(sandbox):
    recorded = sandbox.client.get_run(sandbox.main_run.info.run_id)
    done = sandbox.run("python convert.py source=<MLflow run id> 'variants=[int8]' export.per_channel=false")
    child = sandbox.runs(deeplabq__task="convert")[-1]
    assert child.info.run_name == "convert variants=[int8] export.per_channel=false"
    assert child.data.tags["mlflow.parentRunId"] == sandbox.main_run.info.run_id
    source = sandbox.client.get_run(sandbox.main_run.info.run_id)
    assert source.data.metrics == recorded.data.metrics and source.data.tags == recorded.data.tags
    assert child.info.run_id in done.stdout


def test_mlflow_ui_serves_the_store(sandbox):
    server = sandbox.start(".venv/bin/mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db")
    try:
        deadline, answer = time.monotonic() + 90, None
        while time.monotonic() < deadline and answer is None:
            try:
                with urllib.request.urlopen("http://127.0.0.1:5000/api/2.0/mlflow/experiments/get-by-name"
                                            "?experiment_name=deeplabq", timeout=5) as response:
                    answer = json.load(response)
            except OSError:
                time.sleep(1)
        assert answer is not None and answer["experiment"]["name"] == "deeplabq"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_runs_marks_a_sigkilled_job_killed_and_prints_its_resume_command(sandbox):
    folder = "outputs/killed"
    job = subprocess.Popen(["bash", "-c", "source .venv/bin/activate && exec python train.py smoke=tiny "
                            f"train.checkpoint_every_steps=10 hydra.run.dir={folder}"], cwd=sandbox.root,
                           env=sandbox.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = sandbox.root / folder / "checkpoints" / "checkpoint"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGKILL)  # as the OOM killer would: no finally, no end_run
    job.wait()
    assert checkpoint.is_file()
    (killed,) = [r for r in sandbox.runs() if r.info.status == "RUNNING"]
    assert killed.data.tags["deeplabq.pid"] == str(job.pid)
    done = sandbox.run("python runs.py", smoke=False)
    lines = done.stdout.splitlines()
    assert lines[0] == (f"run {killed.info.run_name} ({killed.info.run_id}) marked KILLED: process {job.pid} on "
                        f"{killed.data.tags['deeplabq.host']} is gone")
    (row,) = [line for line in lines if line.startswith(killed.info.run_name)]  # not the FINISHED main job's
    host = killed.data.tags["deeplabq.host"]
    assert row.split()[1] == "KILLED" and row.split()[-2:] == [f"{host}/{job.pid}", folder]
    resume = f"python train.py smoke=tiny train.checkpoint_every_steps=10 resume=true hydra.run.dir={folder}"
    assert f"    resume: {resume}" in lines
    run = sandbox.client.get_run(killed.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["deeplabq.error"].startswith(f"process {job.pid} ")


@needs(CAMVID)
@needs(PASCAL)
def test_camvid_comparison_from_the_model_zoo_and_its_table(sandbox):
    sandbox.run("python compare.py camvid_pascal")
    table = sandbox.run("python compare.py camvid_pascal --table-only", smoke=False).stdout
    assert "| 0.5 | float |" in table and "qat_int8 (qat_delayed)" in table and "int8 (ptq)" in table
    assert "int8 (ptq_per_tensor)" in table and "int16x8 (ptq_16x8)" in table and "| Pareto |" in table
    assert "| ✓ |" in table  # something is always on the front
    assert (sandbox.root / "docs" / "camvid_pascal_results.png").is_file()
    stages = sandbox.runs(deeplabq__recipe="camvid_pascal")
    assert len(stages) == 2 and all(r.info.status == "FINISHED" for r in stages)  # a parent per command
