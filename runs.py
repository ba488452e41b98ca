"""Stale and interrupted MLflow runs: first mark KILLED the runs whose process is gone (on this host), then list
every KILLED, FAILED or RUNNING run with its host/pid, folder and the command that resumes it.

    python runs.py
    python runs.py --tracking-uri http://127.0.0.1:5000 --experiment deeplabq
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="deeplabq")
    args = parser.parse_args()
    from deeplabq.errors import UserError
    from deeplabq.run_status import report
    try:
        print(report(args.tracking_uri, args.experiment))
    except UserError as error:
        print(f"deeplabq: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
