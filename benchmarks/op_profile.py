"""Where a TFLite file's time goes, op by op, on LiteRT (XNNPACK): several files side by side.

    .venv/bin/python benchmarks/op_profile.py outputs/compare_camvid_pascal/dm0.5/*/tflite/*.tflite
    .venv/bin/python benchmarks/op_profile.py RUN_DIR/tflite --threads 1 2 --runs 50 --csv /tmp/profiles

Every op of every file is cut out into a one-op model and timed on the values it sees when its file runs on
one image (``deeplabq.profiling``); the ops of a file and the whole file are invoked round-robin in one
process, files one after another (for latency ratios between files, use quant_latency.py). Prints, per thread
count: the milliseconds by op type of each file side by side (with each file's whole latency and the sum of
its ops), then the slowest ops of each file. Folders are searched for ``*.tflite``.
"""

import argparse
import os
from pathlib import Path

from deeplabq import profiling
from deeplabq.tracking import cpu_features


def files_of(paths: list[str]) -> dict[str, Path]:
    found = {}
    for given in map(Path, paths):
        for path in sorted(given.rglob("*.tflite")) if given.is_dir() else [given]:
            name = path.stem if path.stem not in found else f"{path.parent.parent.name}/{path.stem}"
            found[name] = path
    return found


def side_by_side(profiles: dict[str, profiling.OpProfile]) -> str:
    """Milliseconds by op type, one column per file; whole-file latency and the sum of the ops last."""
    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p.by("op")},
                 key=lambda op: -max(p.by("op").get(op, 0.0) for p in profiles.values()))
    lines = ["| op type | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{p.by('op').get(op, 0.0):.3f}" for p in profiles.values()) + " |")
    lines.append("| sum of ops | " + " | ".join(f"{p.sum_ms:.3f}" for p in profiles.values()) + " |")
    lines.append("| whole file | " + " | ".join(f"{p.whole_ms:.3f}" for p in profiles.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="TFLite files or folders holding them")
    parser.add_argument("--threads", nargs="+", type=int, default=[2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=10, help="slowest ops listed per file")
    parser.add_argument("--csv", metavar="DIR", help="write each profile to DIR/<file>_<threads>t.csv")
    args = parser.parse_args()
    files = files_of(args.paths)
    if not files:
        parser.error(f"no .tflite file in {args.paths}")
    print(f"CPU features {cpu_features()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for threads in args.threads:
        profiles = {name: profiling.profile_ops(path.read_bytes(), threads=threads, runs=args.runs,
                                                warmup=args.warmup) for name, path in files.items()}
        print(f"\n== {threads} thread(s), median of {args.runs}, ms\n{side_by_side(profiles)}")
        for name, profile in profiles.items():
            print(f"\n-- {name}: {profiling.format_profile(profile, top=args.top)}")
            if args.csv:
                os.makedirs(args.csv, exist_ok=True)
                profile.write_csv(Path(args.csv) / f"{name.replace('/', '_')}_{threads}t.csv")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
