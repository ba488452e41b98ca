"""The errors that mean "your input is wrong": a config value, a dataset file, a checkpoint, a TFLite file,
a run id. The entry points print them as one line (``deeplabq: error: ...``) and exit with status 2; the
MLflow run is FAILED. Every other exception is a bug: it keeps its traceback (exit 1), which the run also
keeps as its ``error.log`` artifact.

Each class also derives from the builtin error it refines (ValueError, FileNotFoundError ...), so code that
catches those keeps working."""


class UserError(Exception):
    """Base of every error caused by what the user gave; the message names the key, file or value."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the value."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file, folder, checkpoint or run the user named does not exist (or holds nothing usable)."""


class SourceError(UserError, ValueError):
    """A model source that exists but does not fit where it was given (a QAT checkpoint as a float one, ...)."""
