"""Register a run's TFLite file in MLflow's model registry, as a pyfunc segmenter with an alias.

    python register.py <MLflow run id> --name deeplabq-synthetic --alias mobile
    python register.py <MLflow run id> --name deeplabq-camvid --artifact int8 --alias candidate
"""

import argparse
import sys
from pathlib import Path

from deeplabq.console import quiet_console  # imports deeplabq first: sets TF_USE_LEGACY_KERAS

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_id", help="the MLflow run whose file is registered")
    parser.add_argument("--name", required=True, help="registered model name (a new version each time)")
    parser.add_argument("--alias", default=None, help="alias pointed at the new version (mobile, candidate ...)")
    parser.add_argument("--artifact", default=None, help="which TFLite file (default: the one the run ships)")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--verbose", action="store_true", help="TensorFlow's and LiteRT's own log lines too")
    args = parser.parse_args()
    quiet_console(args.verbose)  # before TensorFlow loads
    import mlflow

    from deeplabq.errors import UserError
    from deeplabq.model_registry import register

    mlflow.set_tracking_uri(args.tracking_uri)
    try:
        version = register(args.run_id, args.name, args.alias, args.artifact)
    except UserError as error:
        print(f"register: error: {error}", file=sys.stderr)
        sys.exit(2)
    at = f"models:/{args.name}@{args.alias}" if args.alias else f"models:/{args.name}/{version}"
    print(f"registered {args.name} version {version}: {at}")


if __name__ == "__main__":
    main()
