"""A quiet console: TensorFlow's, absl's, LiteRT's and MLflow's chatter off unless ``verbose=true``.

Python loggers and warnings are filtered by level. Native code (TensorFlow's C++ start-up lines, the TFLite
converter, LiteRT's "Created XNNPACK delegate") writes to file descriptors 1 and 2 directly, so those blocks
run under :func:`native_output`, which keeps what they print and gives it back when they fail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

import mlflow  # noqa: F401  (configures its loggers when imported: quiet_console sets their level after that)
from tqdm.auto import tqdm

_VERBOSE = os.environ.get("DEEPLABQ_VERBOSE") == "1"
CHATTY_LOGGERS = ("absl", "tensorflow", "h5py", "mlflow", "alembic", "matplotlib", "PIL")


class CapturedOutput:
    """What a block of native code printed."""

    def __init__(self) -> None:
        self.text = ""

    def tail(self, lines: int = 5) -> str:
        kept = [line for line in self.text.splitlines() if line.strip()]
        return " | ".join(kept[-lines:])


def quiet_console(verbose: bool) -> None:
    """Apply the console policy; call before TensorFlow loads (its C++ log level is read once, at start)."""
    global _VERBOSE
    _VERBOSE = bool(verbose) or os.environ.get("DEEPLABQ_VERBOSE") == "1"
    if _VERBOSE:
        os.environ["DEEPLABQ_VERBOSE"] = "1"  # joblib workers inherit it
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(tensorflow|tf_keras|keras|absl|mlflow)")
    warnings.filterwarnings("ignore", message=r".*(is deprecated|will be removed)")
    if "tensorflow" not in sys.modules:
        captured = CapturedOutput()
        try:
            with native_output(captured):
                import tensorflow  # noqa: F401  (loaded here so its C++ start-up lines stay off the console)
        except BaseException:
            sys.stderr.write(captured.text)
            raise


@contextlib.contextmanager
def native_output(captured: CapturedOutput | None = None):
    """Run the block with file descriptors 1 and 2 sent to a temporary file (unless verbose).

    Yields a :class:`CapturedOutput` (``captured`` if given) whose ``text`` holds what was written once the
    block has ended, also when it raised: the caller quotes it in its error message.
    """
    captured = captured if captured is not None else CapturedOutput()
    if _VERBOSE:
        yield captured
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "img", **kwargs):
    """A tqdm progress bar on stderr, off when stderr is not a terminal (logs and CI stay clean)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True,
                **kwargs)
