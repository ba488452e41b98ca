"""One model, any source, whole images: ``Segmenter.from_source(source, cfg).segment(image)`` gives the label
map of an RGB image at its own size.

The image goes through the run's eval preprocessing (resize to range, pad with the mean pixel:
``preprocess_for_eval``), the model (LiteRT for a .tflite file, Keras for a checkpoint, run folder or MLflow
run id), then the padding is cropped off and the labels resized back (``postprocess_labels``): the same steps
the evaluation takes, so a prediction here is the one evaluation scored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig, open_dict

from deeplabq import data as data_lib
from deeplabq import sources
from deeplabq.config import RunSpec
from deeplabq.errors import ConfigError
from deeplabq.evaluation import TFLiteSegmenter


class Segmenter:
    """``predict(padded image) -> padded labels`` plus the dataset preprocessing it was trained with."""

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], dataset_cfg: DictConfig, name: str) -> None:
        self.predict = predict
        self.dataset_cfg = dataset_cfg
        self.name = name
        self.num_classes = int(dataset_cfg.num_classes)
        self.ignore_label = int(dataset_cfg.ignore_label)

    @classmethod
    def from_source(cls, source: str, cfg: DictConfig, overrides: list[str] = ()) -> Segmenter:
        """A .tflite file (LiteRT), a checkpoint, run folder or MLflow run id (Keras); the source run's own
        backbone, head and dataset preprocessing when it is known (``overrides`` from the command line win).
        A run id is looked up in the MLflow store configured before (``tracking.setup_mlflow``)."""
        resolved = sources.resolve_source(source)
        cfg = sources.with_run_architecture(cfg, resolved, overrides)
        if resolved.kind == "tflite":
            model = TFLiteSegmenter(str(resolved.path), name=resolved.path.name)
            dataset_cfg = cfg.dataset.copy()
            with open_dict(dataset_cfg):
                dataset_cfg.crop_size = list(model.input_hw)  # a TFLite file takes one input size
            return cls(model.predict, dataset_cfg, resolved.describe())
        spec = RunSpec.from_config(cfg)
        try:
            spec.model.validate()
        except ValueError as error:
            raise ConfigError(str(error)) from error
        keras_model = sources.load_keras_model(spec.model, resolved)

        def predict(padded: np.ndarray) -> np.ndarray:
            logits = keras_model(np.asarray(padded, np.float32)[None], training=False)
            return np.argmax(np.asarray(logits)[0], axis=-1)

        return cls(predict, cfg.dataset, resolved.describe())

    def segment(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 RGB pixels (0..255) -> HxW uint8 class ids at the image's own size."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ConfigError(f"{self.name} segments HxWx3 RGB images, got an array of shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ConfigError(f"{self.name} cannot segment an empty image (shape {image.shape})")
        padded, _, valid_hw = data_lib.preprocess_for_eval(image, None, self.dataset_cfg)
        labels = data_lib.postprocess_labels(self.predict(padded), valid_hw, image.shape[:2])
        return labels.astype(np.uint8)
