"""Evaluate a TFLite file, a checkpoint, a run directory or an MLflow run on a dataset split.

    python evaluate.py source=outputs/synthetic/float/<time>/tflite/int8.tflite
    python evaluate.py source=<mlflow run id> eval.split=val
"""

import sys

import hydra
from omegaconf import DictConfig

from deeplabq.cli import exit_status, run_task  # imports deeplabq first: TF_USE_LEGACY_KERAS before TF loads
from deeplabq.console import quiet_console


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    quiet_console(cfg.verbose)  # before TensorFlow loads
    from deeplabq.tasks.evaluate import evaluate

    return run_task(evaluate, cfg)


if __name__ == "__main__":
    main()
    sys.exit(exit_status())  # 2 when a job of a multirun failed
