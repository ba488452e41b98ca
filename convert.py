"""Convert a trained checkpoint (run dir, checkpoint prefix or MLflow run id) to TFLite variants.

    python convert.py source=<mlflow run id> 'variants=[int8]' export.per_channel=false
"""

import sys

import hydra
from omegaconf import DictConfig

from deeplabq.cli import exit_status, run_task  # imports deeplabq first: TF_USE_LEGACY_KERAS before TF loads
from deeplabq.console import quiet_console


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig) -> float:
    quiet_console(cfg.verbose)  # before TensorFlow loads
    from deeplabq.tasks.convert import convert

    return run_task(convert, cfg)


if __name__ == "__main__":
    main()
    sys.exit(exit_status())  # 2 when a job of a multirun failed
