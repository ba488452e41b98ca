"""Label maps of your own images with a TFLite file, a checkpoint, a run directory or an MLflow run.

    python predict.py source=outputs/synthetic/float/<time>/tflite/int8.tflite input=<folder of images>
    python predict.py source=<MLflow run id> input='photos/*.jpg' overlay=true

Writes ``<stem>.png`` (palette PNG of class ids, at the image's size) per image to ``output_dir``. Not an MLflow
run: nothing is logged.
"""

import hydra
from omegaconf import DictConfig

from deeplabq.cli import run_task  # imports deeplabq first: sets TF_USE_LEGACY_KERAS before TensorFlow loads
from deeplabq.console import quiet_console


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> float:
    quiet_console(cfg.verbose)  # before TensorFlow loads
    from deeplabq.tasks.predict import predict

    return run_task(predict, cfg)


if __name__ == "__main__":
    main()
