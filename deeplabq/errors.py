"""The errors that mean "your input is wrong": a config value, a dataset file, a checkpoint, a TFLite file,
a run id. The entry points print them as one line (``deeplabq: error: ...``) and exit with status 2; the
MLflow run is FAILED. Every other exception is a bug: it keeps its traceback."""


class UserError(Exception):
    """Base of every error caused by what the user gave; the message names the key, file or value."""
