"""Train a DeepLab model in any quantization mode, export and evaluate its TFLite artifacts, log to MLflow.

    python train.py                                   # the embedded default (synthetic data, float)
    python train.py dataset=camvid backbone=mnv2_dm100 train.steps=2000
    python train.py -m quant=qat_delayed quant.delay_steps=0,100,200
"""

import sys

import hydra
from omegaconf import DictConfig

from deeplabq.cli import exit_status, run_task  # imports deeplabq first: TF_USE_LEGACY_KERAS before TF loads
from deeplabq.console import quiet_console


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    quiet_console(cfg.verbose)  # before TensorFlow loads
    from deeplabq.tasks.train import train

    return run_task(train, cfg)


if __name__ == "__main__":
    main()
    sys.exit(exit_status())  # 2 when a job of a multirun failed
