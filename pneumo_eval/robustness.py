r"""Robustness job: a trained model under controlled acquisition shifts of a split's images.

    python -m pneumo_eval.robustness --model_dir=runs/cnn                 # its val split
    python -m pneumo_eval.robustness --model_dir=runs/cnn --split=test \
        --threshold_from=runs/cnn/eval-test/report.json --output_dir=reports/cnn-shifts

Every image of ``--split`` is read as the pipeline feeds it to the model (the stored image
resized to the model's input size, stage (b) of :mod:`pneumo_data.preprocess`) and shifted
there, at the model's input size, by each shift of :mod:`pneumo_eval.shifts` (window
changes, brightness, blur, noise, lower resolution, JPEG, border crop and pad, burned-in
text and markers) at severities 1, 2 and 3: 45 conditions. Applying the shifts at the
model's input size keeps a severity meaning the same thing whatever size the data was
stored at (its parameters are fractions of the image side and grey levels of the image the
model sees), and it is where the issue-10 research measured the suite. A real acquisition
change happens before the resize, where noise, JPEG artefacts and thin letters are partly
averaged away by the downsampling; the suite's severities are therefore somewhat harsher
than the same parameters applied to full-size images.

Per condition: ROC AUC, and sensitivity and specificity at the model's operating threshold,
which is, in this order:

1. ``--threshold_from``: a report.json of :mod:`pneumo_eval.evaluate` for this very
   ``model.keras`` (its sha256 is checked);
2. the threshold ``MODEL_DIR/export/saved_model`` ships with, when the export job was
   given one (``serving.json``, for this very model file);
3. chosen on the val split of the model's training data by ``--threshold_policy``
   (evaluate's policy and default).

The report says which. Headline: the mean AUC over the 45 conditions, the worst
specificity over them (and over severities 1-2 only), and how many conditions fall below
specificity 0.80 or sensitivity 0.90. Writes ``report.json``, ``report.md``,
``robustness.png`` (AUC, sensitivity and specificity per shift and severity) and
``scores.npz`` (every condition's scores, for other thresholds) into ``--output_dir``
(default ``MODEL_DIR/robustness-SPLIT``), an output folder with its own ledger.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_data import manifest as manifest_lib
from pneumo_data.common.config import config_to_dict
from pneumo_data.common.files import file_sha256
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import OutputDir
from pneumo_eval import metrics as metrics_lib
from pneumo_eval import plots
from pneumo_eval import shifts as shifts_lib
from pneumo_eval.config import RobustnessConfig, RobustnessError
from pneumo_eval.thresholds import choose_threshold, parse_policy
from pneumo_models import report as report_lib
from pneumo_models.export_meta import (
    chosen_threshold,
    load_serving_meta,
    model_size,
    serving_meta_path,
)
from pneumo_models.report import ReportError, read_threshold
from pneumo_models.rundir import RunDir

log = logging.getLogger("pneumo.robustness")

SPEC_FLOOR = 0.80  # headline counts: conditions below these
SENS_FLOOR = 0.90
SPEC_KEY = f"conditions_specificity_below_{SPEC_FLOOR:.2f}"
SENS_KEY = f"conditions_sensitivity_below_{SENS_FLOOR:.2f}"


# ---------------------------------------------------------------- inputs

def _load_split(eval_dataset, data_dir, split: str, size: int, batch_size: int):
    """(uint8 images [N, M, M], labels [N], patient ids [N]) of ``split`` at the model's size."""
    images, labels, patients = [], [], []
    for x, y, meta in eval_dataset(data_dir, split, batch_size=batch_size,
                                               image_size=size, with_metadata=True):
        images.append(x.numpy()[..., 0])
        labels.append(y.numpy()[:, 0].astype(np.int64))
        patients += [p.decode() for p in meta["patient_id"].numpy()]
    if not images:
        raise RobustnessError(f"split {split!r} of {data_dir} holds no images")
    return np.concatenate(images), np.concatenate(labels), np.array(patients)


def _scores(score, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([score(images[i:i + batch_size, ..., None])
                           for i in range(0, len(images), batch_size)])


def _exported_threshold(model_dir: Path, model_sha: str) -> dict[str, Any] | None:
    """The threshold the export ships with, when an export job gave it one for this model."""
    saved = RunDir(model_dir).saved_model_path
    if not serving_meta_path(saved).exists():
        return None
    meta = load_serving_meta(saved)
    if not chosen_threshold(meta):
        return None
    if meta.get("model_sha256") not in (None, model_sha):
        log.warning("%s was exported from another model file than %s/model.keras; its "
                    "threshold is not used", saved, model_dir)
        return None
    return {"value": float(meta["threshold"]), "source": "export",
            "detail": f"shipped with {saved} ({meta['threshold_source']})"}


def _report_threshold(path: str, model_sha: str, run_dir: RunDir, record) -> dict[str, Any]:
    try:
        chosen = read_threshold(path)
        chosen.check_model(model_sha)
        if record is not None:
            chosen.check_run(run_dir, record)
    except ReportError as error:
        raise RobustnessError(str(error)) from None
    return {"value": chosen.value, "source": "threshold_from",
            "detail": f"{path}: policy {chosen.policy} chosen on {chosen.chosen_on} of "
                      f"{chosen.data}",
            "policy": chosen.policy, "tta": chosen.tta}


# ---------------------------------------------------------------- summary

def condition_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float
                      ) -> dict[str, float | None]:
    """AUC, sensitivity, specificity (at ``threshold``) and mean score of one condition."""
    m = metrics_lib.binary_metrics(labels, scores, threshold)
    return metrics_lib.json_ready({"roc_auc": m["roc_auc"], "sensitivity": m["sensitivity"],
                                   "specificity": m["specificity"],
                                   "mean_score": float(np.mean(scores))})


def _extreme(conditions: list[dict], key: str, severities=(1, 2, 3)) -> dict | None:
    defined = [c for c in conditions if c["severity"] in severities and c[key] is not None]
    if not defined:
        return None
    worst = min(defined, key=lambda c: c[key])
    return {"value": worst[key], "shift": worst["shift"], "severity": worst["severity"]}


def headline(conditions: list[dict]) -> dict[str, Any]:
    """The summary over conditions (undefined values left out, and None when all are)."""
    aucs = [c["roc_auc"] for c in conditions if c["roc_auc"] is not None]
    return {
        "conditions": len(conditions),
        "mean_auc": float(np.mean(aucs)) if aucs else None,
        "min_auc": _extreme(conditions, "roc_auc"),
        "worst_specificity": _extreme(conditions, "specificity"),
        "worst_specificity_severity_1_2": _extreme(conditions, "specificity", (1, 2)),
        "worst_sensitivity": _extreme(conditions, "sensitivity"),
        "mean_sensitivity": _mean(conditions, "sensitivity"),
        "mean_specificity": _mean(conditions, "specificity"),
        SPEC_KEY: sum(
            1 for c in conditions if c["specificity"] is not None
            and c["specificity"] < SPEC_FLOOR),
        SENS_KEY: sum(
            1 for c in conditions if c["sensitivity"] is not None
            and c["sensitivity"] < SENS_FLOOR),
    }


def _mean(conditions, key):
    values = [c[key] for c in conditions if c[key] is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------- the job

def robustness(config: RobustnessConfig) -> dict[str, Any]:
    """Runs the job; returns the report (also written as report.json)."""
    if not config.model_dir:
        raise RobustnessError("--model_dir is required")
    if config.batch_size < 1:
        raise RobustnessError("--batch_size must be positive")
    if config.seed < 0:
        raise RobustnessError("--seed must be >= 0")
    names = tuple(config.shifts) if config.shifts else tuple(shifts_lib.SHIFTS)
    unknown = sorted(set(names) - set(shifts_lib.SHIFTS))
    if unknown:
        raise RobustnessError(f"unknown shift(s) {unknown}; choose from "
                              f"{', '.join(shifts_lib.SHIFTS)}")
    try:
        parse_policy(config.threshold_policy)
    except ValueError as error:
        raise RobustnessError(str(error)) from None
    model_dir = Path(config.model_dir)
    record, train_dir, data_dir, m = RunDir(model_dir).evaluation_data(
        config.data_dir, config.split, RobustnessError)
    run = record.to_dict() if record is not None else {}
    model_path = RunDir(model_dir).model_path
    model_sha = file_sha256(model_path)
    given = _report_threshold(config.threshold_from, model_sha, RunDir(model_dir), record) \
        if config.threshold_from else None
    exported = _exported_threshold(model_dir, model_sha)
    threshold = given or exported
    val_m = None
    if threshold is None:
        same_data = train_dir is None or Path(train_dir).resolve() == Path(data_dir).resolve()
        val_m = m if same_data else manifest_lib.load_manifest(train_dir)
        if record is not None and val_m is not m:
            RunDir(model_dir).check_data(val_m, record, RobustnessError)
        if "val" not in val_m.splits or val_m.count("val") == 0:
            raise RobustnessError(f"{val_m.data_dir} has no val images to choose the threshold "
                                  f"on; pass --threshold_from")
    target = Path(config.output_dir) if config.output_dir \
        else RunDir(model_dir).robustness_dir(config.split)
    with OutputDir(target, job="robustness") as out:
        report = _run(config, names, model_dir, model_path, model_sha, run, m, threshold,
                      exported, val_m, out)
    print(report_markdown(report), flush=True)
    return report


def _run(config, names, model_dir, model_path, model_sha, run, m, threshold, exported, val_m,
         out: OutputDir) -> dict[str, Any]:
    # The job's TensorFlow half, loaded once the options, folders and threshold are checked.
    import_tensorflow()
    from pneumo_data.reader import eval_dataset
    from pneumo_models.models import load_model, predictor

    model = load_model(model_path)
    size = model_size(model)
    score = predictor(model)
    images, labels, patients = _load_split(eval_dataset, m.data_dir, config.split, size,
                                           config.batch_size)
    clean = _scores(score, images, config.batch_size)
    if threshold is None:
        same = val_m is m and config.split == "val"
        val_labels, val_scores = (labels, clean) if same else _load_and_score(
            eval_dataset, val_m.data_dir, size, config.batch_size, score)
        try:
            choice = choose_threshold(val_labels, val_scores, config.threshold_policy)
        except ValueError as error:
            raise RobustnessError(f"cannot choose a threshold on the val split of "
                                  f"{val_m.data_dir}: {error}") from None
        threshold = {"value": choice.threshold, "source": "val_policy",
                     "detail": f"policy {choice.policy} on the val split of {val_m.data_dir} "
                               f"(sensitivity {choice.sensitivity:.3f}, specificity "
                               f"{choice.specificity:.3f} there)",
                     "policy": choice.policy}
    t = float(threshold["value"])
    if exported and threshold["source"] != "export" and exported["value"] != t:
        threshold["export_ships"] = exported["value"]
    log.info("%s on %s (%d images) at %d px, threshold %.4f (%s)", model_path, config.split,
             len(labels), size, t, threshold["source"])
    all_scores = {"clean": clean}
    conditions = []
    started = time.perf_counter()
    for name in names:
        for severity in shifts_lib.SEVERITIES:
            shifted = shifts_lib.apply(name, severity, images, seed=config.seed)
            s = _scores(score, shifted, config.batch_size)
            all_scores[f"{name}_{severity}"] = s
            conditions.append({"shift": name, "severity": severity,
                               "description": shifts_lib.describe(name, severity),
                               **condition_metrics(labels, s, t)})
        c = conditions[-1]
        log.info("%s: severity 3 AUC %s, sensitivity %s, specificity %s", name,
                 _num(c["roc_auc"]), _num(c["sensitivity"]), _num(c["specificity"]))
    seconds = time.perf_counter() - started
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"dir": str(model_dir), "name": run.get("model", model_dir.name),
                  "file_sha256": model_sha, "precision": run.get("precision")},
        "data": {"dir": str(m.data_dir), "split": config.split, "images": int(labels.size),
                 "patients": int(len(set(patients))), "positives": int(labels.sum()),
                 "stored_size": m.image_size},
        "model_input_size": size,
        "applied_at": f"the model's input size ({size} px), after the pipeline's resize",
        "threshold": threshold,
        "clean": condition_metrics(labels, clean, t),
        "headline": headline(conditions),
        "conditions": conditions,
        "seconds": seconds,
        "figures": {"robustness": "robustness.png"},
        "options": config_to_dict(config),
    }
    report = metrics_lib.json_ready(report)
    plots.robustness_png(report, out.claim("robustness.png"))
    with out.replacing("scores.npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, labels=labels, patients=patients, **all_scores)
    out.write_text(report_lib.NAME, json.dumps(report, indent=1) + "\n")
    out.write_text(report_lib.MARKDOWN, report_markdown(report))
    return report


def _load_and_score(eval_dataset, data_dir, size, batch_size, score):
    images, labels, _ = _load_split(eval_dataset, data_dir, "val", size, batch_size)
    return labels, _scores(score, images, batch_size)


def _num(value, digits: int = 3) -> str:
    return "undefined" if value is None else f"{value:.{digits}f}"


def _where(entry: dict | None) -> str:
    if not entry:
        return "undefined"
    return f"{entry['value']:.3f} ({entry['shift']} {entry['severity']})"


def report_markdown(report: dict) -> str:
    h, th, data, clean = report["headline"], report["threshold"], report["data"], report["clean"]
    lines = [
        f"# Robustness: {report['model']['name']} on {data['split']} under acquisition shifts",
        "",
        f"- Images: {data['images']} ({data['positives']} pneumonia, {data['patients']} "
        f"patients) of {data['dir']}, shifted at {report['applied_at']}",
        f"- Threshold: {th['value']:.4f} ({th['source']}: {th['detail']})"
        + (f"; the export ships {th['export_ships']:.4f}" if th.get("export_ships") is not None
           else ""),
        f"- Clean: AUC {_num(clean['roc_auc'])}, sensitivity {_num(clean['sensitivity'])}, "
        f"specificity {_num(clean['specificity'])}",
        "",
        "| headline over the shifted conditions | value |",
        "|---|---|",
        f"| mean ROC AUC over {h['conditions']} conditions | {_num(h['mean_auc'])} |",
        f"| worst specificity (shift, severity) | {_where(h['worst_specificity'])} |",
        f"| worst specificity, severities 1-2 | {_where(h['worst_specificity_severity_1_2'])} |",
        f"| conditions with specificity < {SPEC_FLOOR:.2f} | {h[SPEC_KEY]} |",
        f"| conditions with sensitivity < {SENS_FLOOR:.2f} | {h[SENS_KEY]} |",
        f"| worst sensitivity | {_where(h['worst_sensitivity'])} |",
        f"| lowest AUC | {_where(h['min_auc'])} |",
        f"| mean sensitivity / specificity | {_num(h['mean_sensitivity'])} / "
        f"{_num(h['mean_specificity'])} |",
        "",
        "| shift | severity | parameter | AUC | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["conditions"]:
        parameter = c["description"].split(", ", 1)[-1]
        lines.append(f"| {c['shift']} | {c['severity']} | {parameter} | {_num(c['roc_auc'])} | "
                     f"{_num(c['sensitivity'])} | {_num(c['specificity'])} |")
    lines += ["", "What this can and cannot tell: the shifts imitate acquisition changes on "
                  "images of the same population; they cannot show a change of patients, disease "
                  "mix or labelling, and training augmentation that resembles a shift flatters "
                  "the model on it (see docs/evaluation.md).", "",
              "Figure: [robustness](robustness.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("robustness", RobustnessConfig, robustness)
