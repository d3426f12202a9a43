"""The model_dir: what a training run writes, and the one module that knows its file names.

::

    MODEL_DIR/
      config.json, config.flags   the run's options (identity; a --flagfile that repeats it)
      data/                       prepare's folder, with --source_dir or the embedded data
      logs/                       TensorBoard
      history.csv                 one row per epoch (Keras CSVLogger)
      resume/                     while training: state.json, the last epoch's weights,
                                  phase2.json (removed when the run completes)
      best.keras                  the best val AUC's model
      model.keras                 the shipped model
      trained.keras               with --ema_momentum: the last epoch's trained weights (the
                                  shipped model holds their moving average)
      export/                     the export job's folder: saved_model/, litert/
      run.json                    the run record (:class:`RunRecord`), written last: its
                                  presence marks a complete run
      eval-SPLIT/, robustness-SPLIT/   the evaluation jobs' default output folders

Every job that reads or writes these files asks :class:`RunDir` (no other module opens them
by name). Writing goes through the caller's :class:`~pneumo_data.common.outputs.OutputDir`
(its lock and ledger); reading checks the records and says in one line what is wrong. No
TensorFlow here: the jobs check a model_dir before TensorFlow loads.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from pneumo_data.common.errors import UserError
from pneumo_data.common.files import read_json
from pneumo_data.manifest import load_manifest

CONFIG = "config.json"
FLAGS = "config.flags"
RUN = "run.json"
HISTORY = "history.csv"
MODEL = "model.keras"
BEST = "best.keras"
TRAINED = "trained.keras"  # with --ema_momentum: the weights before averaging
LOGS = "logs"
DATA = "data"
RESUME = "resume"
STATE = f"{RESUME}/state.json"
PHASE2 = f"{RESUME}/phase2.json"
EXPORT = "export"
SAVED_MODEL = "saved_model"  # in EXPORT
LITERT = "litert"            # in EXPORT
WEIGHTS_PATTERN = re.compile(r"model-p\d+-e\d+\.weights\.h5")

log = logging.getLogger("pneumo.train")


class RunDirError(UserError):
    """A model_dir that is not (or not yet) what the job needs; the message says why."""


def weights_name(phase: int, epoch: int) -> str:
    """The resume weights file of ``epoch`` (0-based) of training phase ``phase``."""
    return f"model-p{phase}-e{epoch}.weights.h5"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """``run.json``: what a finished run was and did (written last: it marks completion)."""

    model: str
    recipe: str
    ship: str
    precision: str
    jit_compile: bool
    deterministic: bool
    seed: int
    tensorflow: str
    keras: str
    distribution: dict[str, Any]
    data_dir: str | None          # relative to the model_dir
    data_manifest_created: str
    data_splits: dict[str, str]   # Manifest.split_digests(): which images each split held
    train_counts: dict[str, int]
    val_metrics: dict[str, float]
    history: list[dict[str, float]]
    time_budget: dict[str, Any]   # TimeBudget.record(): the plan, image_size and probe of
                                  # --budget_plan=probe, the epochs' durations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: Path) -> "RunRecord":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise RunDirError(f"{where} is not a run record of this version of the training "
                              f"job (expected the fields {names}); train the model again")
        return cls(**data)


class RunDir:
    """A training run's folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def best_path(self) -> Path:
        return self.path / BEST

    @property
    def trained_path(self) -> Path:
        """With ``--ema_momentum``: the last trained weights, before averaging."""
        return self.path / TRAINED

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY

    @property
    def logs_path(self) -> Path:
        return self.path / LOGS

    @property
    def export_path(self) -> Path:
        return self.path / EXPORT

    @property
    def saved_model_path(self) -> Path:
        return self.path / EXPORT / SAVED_MODEL

    @property
    def litert_path(self) -> Path:
        return self.path / EXPORT / LITERT

    def eval_dir(self, split: str) -> Path:
        """The evaluation job's default output folder for ``split``."""
        return self.path / f"eval-{split}"

    def robustness_dir(self, split: str) -> Path:
        """The robustness job's default output folder for ``split``."""
        return self.path / f"robustness-{split}"

    # ------------------------------------------------------------------ the finished run
    def is_complete(self) -> bool:
        return (self.path / RUN).is_file()

    def require_finished(self) -> RunRecord:
        """The run record, or a :class:`RunDirError` saying what is missing (for the jobs that
        use a trained model: evaluate, predict, export, robustness)."""
        if not self.path.is_dir():
            raise RunDirError(f"model_dir {self.path} does not exist")
        if not self.model_path.is_file():
            raise RunDirError(f"{self.path} has no {MODEL} (is the training finished?)")
        if not self.is_complete():
            raise RunDirError(f"{self.path} has no {RUN}: the training has not finished")
        return self.record()

    def record(self) -> RunRecord:
        """The run record (``run.json``), checked."""
        return RunRecord.from_dict(read_json(self.path / RUN, "run record"), self.path / RUN)

    def is_training_data(self, data_dir, record: RunRecord | None = None) -> bool:
        """True when folder ``data_dir`` is the one the run was trained on."""
        trained = self.data_dir(record)
        return trained is not None and Path(data_dir).resolve() == trained.resolve()

    def check_data(self, m, record: RunRecord | None = None,
                   error: type[UserError] = RunDirError) -> None:
        """Raises ``error`` when prepared folder ``m``, the run's training data, no longer holds
        the splits the run was trained (and its threshold chosen) on: it was prepared again
        since, and a patient of the training split may now sit in val or test."""
        record = record or self.record()
        now = m.split_digests()
        changed = sorted(split for split in set(record.data_splits) | set(now)
                         if record.data_splits.get(split) != now.get(split))
        if changed:
            raise error(
                f"{m.data_dir} was prepared again after {self.path} was trained on it: its "
                f"{', '.join(changed)} split(s) no longer hold the images the model was trained "
                f"and thresholded on, so a score on them could include training images. Use "
                f"the data the model was trained on (prepare it again with the run's options "
                f"into another folder), or train again on the new splits")

    def data_dir(self, record: RunRecord | None = None) -> Path | None:
        """The data_dir the run was trained on (recorded relative to the model_dir)."""
        recorded = (record or self.record()).data_dir
        if not recorded:
            return None
        return Path(recorded) if Path(recorded).is_absolute() \
            else (self.path / recorded).resolve()

    def write_record(self, out, record: RunRecord) -> Path:
        """Writes ``run.json`` through OutputDir ``out`` (last: it marks the run complete)."""
        return out.write_json(RUN, record.to_dict())

    def record_if_complete(self) -> RunRecord | None:
        return self.record() if self.is_complete() else None

    def evaluation_data(self, data_dir, split: str, error: type[UserError] = RunDirError):
        """What a job that scores the trained model on ``split`` reads: ``(run record or None,
        the training data folder or None, the folder to read: ``data_dir`` or the training
        one, its manifest)``, with the model file there and ``split`` holding images;
        ``error`` says what is missing."""
        if not self.model_path.exists():
            raise error(f"{self.path} has no {MODEL} (is the training finished?)")
        record = self.record_if_complete()
        train_dir = self.data_dir(record) if record is not None else None
        data_dir = Path(data_dir) if data_dir else train_dir
        if data_dir is None:
            raise error(f"no --data_dir given and {self.path / RUN} names none")
        m = load_manifest(data_dir)
        m.require_split(split)
        if m.count(split) == 0:
            raise error(f"split {split!r} of {data_dir} holds no images")
        if record is not None and self.is_training_data(data_dir, record):
            self.check_data(m, record, error)
        return record, train_dir, data_dir, m

    # ------------------------------------------------------------------ the run's options
    def config(self) -> dict[str, Any] | None:
        """The recorded run options (``config.json``), or None before a run wrote them."""
        path = self.path / CONFIG
        return read_json(path, "run config") if path.exists() else None

    def write_config(self, out, identity: dict[str, Any], flagfile: str) -> None:
        """Writes ``config.json`` (the run's identity) and ``config.flags`` (a --flagfile)."""
        out.write_json(CONFIG, identity)
        out.write_text(FLAGS, flagfile)

    def claim_previous(self, out, identity: dict[str, Any], overwrite: bool,
                       same=None) -> bool:
        """Decides what an earlier run in this folder means for a run of ``identity``: True
        when the folder holds this very run complete (nothing to do); False when it holds
        nothing, or this run unfinished (it resumes), or another run that ``overwrite``
        allowed to be cleared (only the training job's own files are deleted). Raises
        RunDirError for another run without ``overwrite``. ``same(recorded identity)``
        decides whether the recorded run is this one (default: equal identities)."""
        existing = self.config()
        if existing is None:
            return False
        if not (same(existing) if same is not None else existing == identity):
            if not overwrite:
                diff = ", ".join(_diff(existing, identity))
                raise RunDirError(
                    f"{self.path} holds another run ({diff}); choose another --model_dir, or "
                    f"pass --overwrite to replace that run (only the files the training job "
                    f"wrote are deleted)")
            removed = out.clear()
            log.info("--overwrite: removed the previous run's %s", ", ".join(removed))
            return False
        return self.is_complete()

    # ------------------------------------------------------------------ history
    def history(self) -> list[dict[str, float]]:
        """history.csv as one dict per epoch (values as floats, empty cells left out)."""
        if not self.history_path.exists():
            return []
        with open(self.history_path) as handle:
            return [{k: float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(handle)]

    def best_so_far(self, key: str = "val_auc") -> float | None:
        """The best finite ``key`` of the epochs in history.csv (None: none yet)."""
        values = [row[key] for row in self.history() if key in row]
        finite = [v for v in values if math.isfinite(v)]
        return max(finite) if finite else None

    def truncate_history(self, out, first_epoch: int) -> None:
        """Drops history rows of epochs that will run again (a kill between writes)."""
        if not self.history_path.exists():
            return
        with open(self.history_path) as handle:
            rows = list(csv.DictReader(handle))
        kept = [r for r in rows if int(r["epoch"]) < first_epoch]
        if len(kept) == len(rows):
            return
        with out.replacing(HISTORY) as tmp, open(tmp, "w", newline="") as handle:
            if kept:
                writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(kept)

    # ------------------------------------------------------------------ resume state
    def resume_state(self) -> dict[str, Any] | None:
        """The resume state of an unfinished run (``resume/state.json``), or None; a
        RunDirError when it names a weights file that is not there."""
        path = self.path / STATE
        if not path.exists():
            return None
        state = read_json(path, "resume state")
        weights = self.path / RESUME / str(state.get("weights"))
        if not (WEIGHTS_PATTERN.fullmatch(weights.name) and weights.is_file()):
            raise RunDirError(f"{self.path / RESUME} holds the resume state of an older version "
                              f"of this job, or its weights file is missing; pass --overwrite "
                              f"to start the run over")
        return state

    def resume_weights(self, state: dict[str, Any]) -> Path:
        return self.path / RESUME / state["weights"]

    def write_resume_state(self, out, state: dict[str, Any]) -> None:
        out.write_json(STATE, state)

    def mark_finished(self, out) -> None:
        """Records in the resume state that its phase ended (its last epoch, or early
        stopping), so a run killed after that point does not train that phase again."""
        path = self.path / STATE
        if path.exists():
            state = read_json(path, "resume state")
            if not state.get("finished"):
                out.write_json(STATE, {**state, "finished": True})

    def recorded_data_splits(self) -> dict[str, str] | None:
        """The data identity the run recorded (:meth:`Manifest.split_digests` of its training
        data): in run.json once complete, else in the resume state; None before either."""
        if self.is_complete():
            return self.record().data_splits
        path = self.path / STATE
        return read_json(path, "resume state").get("data_splits") if path.exists() else None

    def phase2_start(self) -> int:
        return int(read_json(self.path / PHASE2, "resume state")["start"])

    def write_phase2_start(self, out, start: int) -> None:
        out.write_json(PHASE2, {"start": start})

    def run_state_files(self) -> list[str]:
        """The files a worker of a cluster needs from the chief to continue the run: the
        resume state (and the weights file it names), the best checkpoint (fine-tuning can
        start from it, the final model can be it) and the history (the best val AUC so far,
        the epochs done); those that exist."""
        names = [STATE, PHASE2, BEST, HISTORY]
        state = self.path / STATE
        if state.is_file():
            names.append(f"{RESUME}/{read_json(state, 'resume state').get('weights')}")
        return [n for n in names if is_run_state(n) and (self.path / n).is_file()]


def is_run_state(name: str) -> bool:
    """True for the names :meth:`RunDir.run_state_files` may list (checked when a worker
    unpacks what the chief sent)."""
    return name in (STATE, PHASE2, BEST, HISTORY) or (
        name.startswith(f"{RESUME}/")
        and WEIGHTS_PATTERN.fullmatch(name[len(RESUME) + 1:]) is not None)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
