"""Small training runs for the training tests: a tiny config on a prepared folder, the epochs a
history holds, and a run killed (SIGKILL) at a chosen point in its own process."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

from pneumo_data.common.config import leaves, with_leaves
from pneumo_models.train import TrainConfig
from tests.helpers import run_code


def small(prepared, model_dir, **kw):
    base = dict(data_dir=str(prepared), model_dir=str(model_dir), image_size=32, batch_size=8,
                epochs=2, steps_per_epoch=3, precision="float32", early_stopping_patience=0,
                bn_stats_images=16)
    base.update(kw)
    return with_leaves(TrainConfig(), **base)


def epochs_in(history: Path):
    with open(history) as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def train_killed(config, patch: str, cwd: Path | None = None) -> None:
    """Runs the job on ``config`` in a subprocess after ``patch`` (Python source run first,
    which arranges a SIGKILL); asserts the process was killed."""
    code = (
        "import os, signal\n"
        "from pneumo_data.common.config import with_leaves\n"
        "import pneumo_models.callbacks as cb\n"
        "import pneumo_models.train as t\n"
        f"{patch}"
        f"t.train(with_leaves(t.TrainConfig(), **{leaves(config)!r}))\n")
    proc = run_code(code, cwd=cwd or Path.cwd())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


KILL_AFTER_SECOND_EPOCH = (
    "original = cb.Resume.on_epoch_end\n"
    "def killer(self, epoch, logs=None):\n"
    "    original(self, epoch, logs)\n"
    "    if epoch == 1:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "cb.Resume.on_epoch_end = killer\n")


# The job killed when it starts to write its final model (after the last epoch).
KILL_WHILE_EXPORTING = (
    "import pneumo_models.training as e\n"
    "def killer(*args, **kwargs):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "e.export_into_model_dir = killer\n")
