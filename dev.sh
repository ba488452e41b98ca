#!/usr/bin/env bash
# One entry for a fresh machine with Python 3.11: sets up .venv (once, again when pyproject.toml changes),
# then runs what you ask.
#   bash dev.sh train [hydra overrides...]   the main job (embedded synthetic dataset, float + TFLite variants)
#   bash dev.sh test [pytest args...]        the test suite (pytest, two workers; -n 0 for one process)
#   bash dev.sh server [--dir D --host H --port P, mlflow server options...]   the team tracking server
#                                            (PostgreSQL + MLflow basic-auth + proxied artifacts; deeplabq/server.py)
#   bash dev.sh python|evaluate|convert|mlflow ...
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.deeplabq-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
# A linked .venv (a worktree's, or the README tests' copy of the repo) belongs to the checkout it links to:
# installing from here would point its editable deeplabq at this folder.
if [ ! -L .venv ] && { [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; }; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$want" > "$stamp"
fi
command=${1:-train}
shift || true
case "$command" in
  train) exec .venv/bin/python train.py "$@" ;;
  evaluate) exec .venv/bin/python evaluate.py "$@" ;;
  convert) exec .venv/bin/python convert.py "$@" ;;
  test) exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@" ;;  # two workers, one file each at a time
  server) exec .venv/bin/python -m deeplabq.server "$@" ;;
  python) exec .venv/bin/python "$@" ;;
  mlflow) exec .venv/bin/mlflow "$@" ;;
  *) echo "usage: bash dev.sh train|test|server|evaluate|convert|python|mlflow [args...]" >&2; exit 2 ;;
esac
