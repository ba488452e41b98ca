"""deeplabq: quantized DeepLab (MobileNetV2) segmentation, configured by Hydra, tracked in MLflow."""

import os
import sys
from pathlib import Path

# tfmot only accepts tf_keras models; this must be set before TensorFlow is first imported.
if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    raise ImportError(
        "deeplabq needs TF_USE_LEGACY_KERAS=1, but TensorFlow was imported before deeplabq without it. "
        "Import deeplabq first or export TF_USE_LEGACY_KERAS=1."
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# conf/paths/default.yaml reads the project root from here, so composed configs get absolute paths.
os.environ.setdefault("DEEPLABQ_ROOT", str(Path(__file__).resolve().parent.parent))

__version__ = "0.1.0"
