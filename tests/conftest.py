# deeplabq sets TF_USE_LEGACY_KERAS, which must happen before any test module imports TensorFlow.
import deeplabq  # noqa: F401
