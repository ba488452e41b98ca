"""The float-vs-quantized comparison of a recipe, from one command (compare.py).

Runs the recipe's stages in dependency order as ordinary train.py jobs (float first; QAT fine-tune starts from
its checkpoint; delayed QAT trains on its own), under one MLflow parent run, then writes the results table
and the mIoU-vs-latency / mIoU-vs-size plot. A stage whose metrics.json exists is not run again, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from deeplabq import tracking
from deeplabq.errors import ConfigError, InputNotFoundError, UserError
from deeplabq.evaluation import artifacts_in, interleaved_latency
from deeplabq.pareto import pareto_front

ROOT = Path(__file__).resolve().parents[2]  # the project root
RECIPES = {
    # stage name -> experiment preset; "float" must come first (ptq and qat_finetune start from its checkpoint)
    "camvid": {"float": "camvid_float", "ptq": "camvid_ptq", "qat_finetune": "camvid_qat_finetune",
               "qat_delayed": "camvid_qat_delayed"},
    # the same stages fine-tuned from the model-zoo PASCAL VOC checkpoint (dm 0.5 only)
    "camvid_pascal": {"float": "camvid_pascal_float", "ptq": "camvid_pascal_ptq",
                      "qat_finetune": "camvid_pascal_qat_finetune", "qat_delayed": "camvid_pascal_qat_delayed",
                      "ptq_per_tensor": "camvid_pascal_ptq_per_tensor", "ptq_16x8": "camvid_pascal_ptq16x8"},
}
# the stages that start from the float stage's checkpoint
FROM_FLOAT_STAGES = ("ptq", "qat_finetune", "ptq_per_tensor", "ptq_16x8")
# recipes that start from a checkpoint of one width
RECIPE_DEPTH_MULTIPLIERS = {"camvid_pascal": (0.5,)}
BACKBONES = {0.5: "mnv2_dm050", 1.0: "mnv2_dm100"}


def default_out_dir(recipe: str) -> Path:
    """Where a recipe's stage runs go by default: outputs/compare for camvid (as before), else
    outputs/compare_<recipe>, so two recipes never share (and reuse) a stage directory."""
    return ROOT / "outputs" / ("compare" if recipe == "camvid" else f"compare_{recipe}")


def _stage_overrides(stage: str, float_dir: Path, tracking_uri: str) -> list[str]:
    float_checkpoint = [f"quant.float_checkpoint={float_dir}"] if stage in FROM_FLOAT_STAGES else []
    return [f"tracking.tracking_uri={tracking_uri}", *float_checkpoint]


def run_stage(preset: str, backbone: str, run_dir: Path, overrides: list[str], env: dict) -> dict:
    """One train.py job; returns its metrics.json plus the wall time it took."""
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        print(f"[compare] {run_dir} already done, reusing its metrics")
        return json.loads(metrics_file.read_text())
    command = [sys.executable, str(ROOT / "train.py"), f"experiment={preset}", f"backbone={backbone}",
               f"hydra.run.dir={run_dir}", *overrides]
    print("[compare] " + " ".join(command), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, env=env)
    if done.returncode != 0:  # the job printed why; the comparison stops with one line more
        raise UserError(f"stage {preset} failed (exit status {done.returncode}); its run folder is {run_dir}")
    metrics = json.loads(metrics_file.read_text())
    metrics["wall_time_s"] = time.perf_counter() - start
    metrics_file.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics


def results_rows(stage_metrics: dict[str, dict], dm: float, stage_dirs: dict[str, Path]) -> list[dict]:
    """One row per artifact: the float run's float and PTQ files, then each later stage's own files (their
    copy of the float file is left out; a variant a later stage exports replaces the float run's).
    Latencies are the ones each run measured; :func:`remeasure_latency` replaces them."""
    rows = []
    float_metrics = stage_metrics["float"]
    later = {k.split("/")[0] for stage, m in stage_metrics.items() if stage != "float" for k in m}
    for stage, metrics in stage_metrics.items():
        artifacts = sorted(artifacts_in(metrics),
                           key=lambda a: ("float", "float16", "dynamic_range", "int8", "int16x8", "qat_int8").index(a))
        skip = {"float"} if stage != "float" else later - {"float"}
        artifacts = [a for a in artifacts if a not in skip]
        for artifact in artifacts:
            name = artifact if stage == "float" else f"{artifact} ({stage})"
            rows.append({
                "dm": dm, "artifact": name, "path": str(stage_dirs[stage] / "tflite" / f"{artifact}.tflite"),
                "miou": metrics[f"{artifact}/miou"],
                "delta": metrics[f"{artifact}/miou"] - float_metrics["float/miou"],
                "size_bytes": metrics[f"{artifact}/size_bytes"],
                "latency_t1": metrics[f"{artifact}/latency_ms_t1"], "latency_t2": metrics[f"{artifact}/latency_ms_t2"],
                "speedup_t1": float_metrics["float/latency_ms_t1"] / metrics[f"{artifact}/latency_ms_t1"],
                "speedup_t2": float_metrics["float/latency_ms_t2"] / metrics[f"{artifact}/latency_ms_t2"],
                "stage_time_min": metrics.get("wall_time_s", float("nan")) / 60,
            })
    return rows


def remeasure_latency(rows: list[dict], threads=(1, 2), runs: int = 30) -> None:
    """Time every artifact again, all in this process and interleaved (see
    ``evaluation.interleaved_latency``): the stages ran hours apart under different background load, so
    their own latencies do not compare. Speed-ups are against the float file of the same depth multiplier."""
    for count in threads:
        latency = interleaved_latency({row["path"]: row["path"] for row in rows}, count, runs=runs)
        for row in rows:
            row[f"latency_t{count}"] = latency[row["path"]]
    for row in rows:
        base = next(r for r in rows if r["dm"] == row["dm"] and r["artifact"] == "float")
        for count in threads:
            row[f"speedup_t{count}"] = base[f"latency_t{count}"] / row[f"latency_t{count}"]


def mark_pareto(rows: list[dict]) -> None:
    """``row["pareto"]``: no other artifact of the table has a higher-or-equal mIoU, a lower-or-equal 1-thread
    latency and a smaller-or-equal size, with one of them strictly better (deeplabq.pareto)."""
    for row, on_front in zip(rows, pareto_front(rows), strict=True):
        row["pareto"] = on_front


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dm | artifact | mIoU (val) | Δ vs float | size | latency 1t (ms) | latency 2t (ms) "
             "| speed-up 1t / 2t | stage time (min) | Pareto |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kib = r["size_bytes"] / 1024
        size = f"{kib:.0f} KB" if kib < 1024 else f"{kib / 1024:.2f} MB"
        lines.append(f"| {r['dm']} | {r['artifact']} | {r['miou']:.2f} | {r['delta']:+.2f} | {size} "
                     f"| {r['latency_t1']:.1f} | {r['latency_t2']:.1f} "
                     f"| {r['speedup_t1']:.2f}x / {r['speedup_t2']:.2f}x | {r['stage_time_min']:.1f} "
                     f"| {'✓' if r.get('pareto') else ''} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "latency_t1", "latency, 1 thread (ms)"), (axes[1], "size_bytes", "size (KB)")):
        front = []
        for r in rows:
            x = r[key] / 1024 if key == "size_bytes" else r[key]
            ax.scatter(x, r["miou"], marker="o" if r["dm"] == 0.5 else "s", s=60 if r.get("pareto") else 25,
                       edgecolors="red" if r.get("pareto") else "none", linewidths=1.5, zorder=3)
            ax.annotate(f"{r['artifact']} dm{r['dm']}", (x, r["miou"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
            if r.get("pareto"):
                front.append((x, r["miou"]))
        if front:
            ax.scatter([], [], s=60, facecolors="none", edgecolors="red", label="Pareto front (mIoU, latency 1t, size)")
            ax.legend(fontsize=7, loc="lower right")
        if key == "latency_t1" and max(r[key] for r in rows) > 10 * min(r[key] for r in rows):
            ax.set_xscale("log")  # e.g. a 16x8 file on TFLite's reference kernels, 50x the others
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU on val (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("CamVid: mIoU against latency and size, one point per TFLite artifact")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_comparison(recipe: str, depth_multipliers: list[float], overrides: list[str], out_dir: Path,
                   tracking_uri: str, docs_dir: Path, table_only: bool = False) -> str:
    """Run the recipe's stages (or, with ``table_only``, none: the table then has the finished ones)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    for dm in depth_multipliers:
        if dm not in BACKBONES:
            raise ConfigError(f"--depth-multipliers: {dm} has no backbone option; choose from {sorted(BACKBONES)}")
        if dm not in RECIPE_DEPTH_MULTIPLIERS.get(recipe, BACKBONES):
            raise ConfigError(f"--depth-multipliers: recipe {recipe!r} starts from a checkpoint of depth multiplier "
                             f"{RECIPE_DEPTH_MULTIPLIERS[recipe]}, not {dm}")
    experiment_id = tracking.setup_mlflow(OmegaConf.create(
        {"tracking_uri": tracking_uri, "experiment_name": "deeplabq", "artifact_location": str(ROOT / "mlartifacts")}))
    client = MlflowClient()
    parent = client.create_run(experiment_id, run_name=f"compare {recipe} dm{depth_multipliers}",
                               tags={"deeplabq.sweep": "parent", "deeplabq.recipe": recipe,
                                     **tracking.process_tags()})
    env = {**os.environ, tracking.PARENT_ENV: parent.info.run_id}
    rows = []
    try:
        for dm in depth_multipliers:
            stage_metrics = {}
            stage_dirs = {stage: out_dir / f"dm{dm}" / stage for stage in RECIPES[recipe]}
            for stage, preset in RECIPES[recipe].items():
                if table_only:
                    finished = stage_dirs[stage] / "metrics.json"
                    if stage == "float" and not finished.is_file():
                        raise InputNotFoundError(f"--table-only: {finished} does not exist (the float stage is needed)")
                    if finished.is_file():
                        stage_metrics[stage] = json.loads(finished.read_text())
                    continue
                stage_metrics[stage] = run_stage(
                    preset, BACKBONES[dm], stage_dirs[stage],
                    [*_stage_overrides(stage, stage_dirs["float"], tracking_uri), *overrides], env)
            rows += results_rows(stage_metrics, dm, stage_dirs)
        print("[compare] timing every artifact again, interleaved in one process", flush=True)
        remeasure_latency(rows)
        mark_pareto(rows)
        table = markdown_table(rows)
        (docs_dir / f"{recipe}_results.md").parent.mkdir(parents=True, exist_ok=True)
        (docs_dir / f"{recipe}_results.md").write_text(table + "\n")
        (docs_dir / f"{recipe}_results.json").write_text(json.dumps(rows, indent=1))
        plot(rows, docs_dir / f"{recipe}_results.png")
        for name in ("md", "json", "png"):
            client.log_artifact(parent.info.run_id, str(docs_dir / f"{recipe}_results.{name}"))
    except BaseException:
        client.set_terminated(parent.info.run_id, status="FAILED")
        raise
    client.set_terminated(parent.info.run_id, status="FINISHED")
    return table
