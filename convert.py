"""Convert a trained checkpoint (run dir, checkpoint prefix or MLflow run id) to TFLite variants.

    python convert.py source=<mlflow run id> 'variants=[int8]' export.per_channel=false
"""

import hydra
from omegaconf import DictConfig

from deeplabq.cli import run_task  # imports deeplabq first: sets TF_USE_LEGACY_KERAS before TensorFlow loads
from deeplabq.console import quiet_console


@hydra.main(version_base="1.3", config_path="conf", config_name="convert")
def main(cfg: DictConfig) -> float:
    quiet_console(cfg.verbose)  # before TensorFlow loads
    from deeplabq.tasks.convert import convert

    return run_task(convert, cfg)


if __name__ == "__main__":
    main()
