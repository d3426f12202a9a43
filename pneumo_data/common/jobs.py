"""The ``__main__`` of every pneumo job: flags from its config, quiet start-up, clean errors.

    if __name__ == "__main__":
        run_job("train", TrainConfig, train)

* Flags come from the job's config dataclass (:mod:`pneumo_data.common.config`); absl's
  ``--flagfile`` works, and ``--verbosity`` (absl's own flag) sets how much is printed.
* Quiet by default: TensorFlow's C++ start-up lines (oneDNN notes, "Could not find cuda
  drivers", "failed call to cuInit" on machines without a GPU, CPU feature notes) are filtered
  out while TensorFlow is imported and its devices are listed. They are written before
  TensorFlow's log threshold applies, so ``TF_CPP_MIN_LOG_LEVEL`` alone cannot hide them;
  :func:`import_tensorflow` catches them at the file-descriptor level and replays every other
  line. ``--verbosity=1`` (or higher) shows them all, and TensorFlow's later C++ logs too.
* Errors: a :class:`UserError` ends the process with ``JOB: error: message`` and exit status
  1, no traceback; so does a permission or disk-full error. Anything else is a bug and keeps
  its traceback. Ctrl-C ends with status 130 and one line.

Where TensorFlow loads. A job module imports no TensorFlow at module level (its config and
checks are TF-free), so ``--helpfull``, a bad flag, a missing folder or a busy output folder
are answered in about a second rather than after TensorFlow's 10-15 s load. Each job has one
documented place, after its checks, where it calls :func:`import_tensorflow` (which installs
the start-up filter) and then imports its TensorFlow half (the modules that import TensorFlow
at module level: the reader, the models, the loop, the exports...). ``run_job`` itself never
loads TensorFlow.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import tempfile
from typing import Callable

from pneumo_data.common.config import config_from_flags, define_flags
from pneumo_data.common.errors import UserError

__all__ = ["UserError", "run_job", "import_tensorflow"]

# C++ lines TensorFlow prints at start-up that say nothing actionable to a pneumo user.
_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IW]\d{4} [\d:. ]+\d+ \S+:\d+\] "),  # absl INFO / WARNING lines
    re.compile(r"^E\d{4} [\d:. ]+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit"),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow"),
    re.compile(r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$"),  # LiteRT
)
_imported = False
_verbosity = 0  # --verbosity of the job run_job runs


def _is_noise(line: str) -> bool:
    return any(p.search(line) for p in _NOISE)


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool] | None = None):
    """Captures what is written to the stderr file descriptor (C++ logs included) while the
    block runs, then writes back every line that is not TensorFlow start-up noise and that
    ``drop`` (if given) does not reject."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if line.strip() and not _is_noise(line) and not (drop and drop(line))]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def import_tensorflow(verbosity: int | None = None):
    """Imports TensorFlow (once) with its start-up noise filtered; returns the module.

    With ``verbosity >= 1`` (default: the running job's ``--verbosity``) nothing is filtered
    and TensorFlow's C++ log threshold stays where the environment put it. Otherwise
    ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (later C++ INFO and WARNING lines hidden, errors
    shown) unless the environment sets it.
    """
    global _imported
    verbosity = _verbosity if verbosity is None else verbosity
    if verbosity >= 1 or _imported or "tensorflow" in sys.modules:
        import tensorflow as tf
        _imported = True
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with filtered_stderr():
        import tensorflow as tf
        tf.config.list_physical_devices()  # device initialisation logs (cuInit) here
    _imported = True
    _quiet_python_loggers()
    return tf


def verbosity() -> int:
    """The running job's ``--verbosity`` (0 outside a job)."""
    return _verbosity


def show_progress() -> bool:
    """Whether a job may draw progress bars: on a terminal only (a log file or a pipe gets
    none), and not under ``--verbosity=-1``."""
    return sys.stderr.isatty() and _verbosity >= 0


def _quiet_python_loggers() -> None:
    # TensorFlow's Python logger repeats C++-level advice (retracing notes, autograph hints).
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.WARNING)


def _error_exit(name: str, message: str, code: int = 1):
    print(f"{name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def run_job(name: str, config_cls, job: Callable) -> None:
    """Parses the flags of ``config_cls``, then runs ``job(config)`` (see the module docstring)."""
    from absl import app, flags

    define_flags(config_cls)

    def main(argv):
        if len(argv) > 1:
            _error_exit(name, f"unexpected arguments {argv[1:]} (flags look like --name=value)")
        verbosity = flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS else 0
        level = logging.WARNING if verbosity < 0 else logging.INFO
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                            force=True)
        global _verbosity
        _verbosity = verbosity
        try:
            job(config_from_flags(config_cls))
        except UserError as error:
            _error_exit(name, str(error))
        except PermissionError as error:
            _error_exit(name, f"permission denied: {error.filename or error}")
        except OSError as error:
            if error.errno == errno.ENOSPC:
                _error_exit(name, f"no space left on the device ({error.filename or error})")
            raise
        except KeyboardInterrupt:
            _error_exit(name, "interrupted", 130)

    app.run(main)
