"""Run a recipe's whole float-vs-quantized comparison and write its results table and plot.

    python compare.py camvid                                   # dm 0.5: float (+PTQ), QAT fine-tune, delayed QAT
    python compare.py camvid --depth-multipliers 0.5 1.0
    python compare.py camvid -- train.steps=1000               # extra overrides for every stage
    python compare.py camvid --depth-multipliers 0.5 1.0 --table-only   # run nothing: table of the finished stages
    python compare.py camvid_pascal                            # the same from the model-zoo PASCAL checkpoint
"""

import argparse
import sys
from pathlib import Path

from deeplabq.console import quiet_console  # imports deeplabq first: sets TF_USE_LEGACY_KERAS

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name (camvid, camvid_pascal)")
    parser.add_argument("--depth-multipliers", type=float, nargs="+", default=[0.5])
    parser.add_argument("--out", type=Path, default=None,
                        help="stage run directories (default: outputs/compare for camvid, "
                             "else outputs/compare_<recipe>)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the table and plot go")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--table-only", action="store_true",
                        help="run no stage; time the finished stages' files again and write the table")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and LiteRT's own log lines too")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every stage")
    args = parser.parse_args()
    quiet_console(args.verbose)  # before TensorFlow loads
    from deeplabq.errors import UserError
    from deeplabq.tasks.compare import default_out_dir, run_comparison
    try:
        out = args.out if args.out is not None else default_out_dir(args.recipe)
        table = run_comparison(args.recipe, args.depth_multipliers, args.overrides, out.resolve(),
                               args.tracking_uri, args.docs.resolve(), table_only=args.table_only)
    except UserError as error:
        sys.exit(f"compare: error: {error}")
    print(table)


if __name__ == "__main__":
    main()
