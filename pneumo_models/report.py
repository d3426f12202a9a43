"""``report.json``: the evaluation of one model file, and the one module that knows its fields.

Written by ``python -m pneumo_eval.evaluate`` (with ``report.md``, rendered here); read by the
export job (``--threshold_from``: the threshold a SavedModel and the LiteRT files carry), by
``predict`` and by ``robustness``. A report says which model file it evaluated (its sha256),
which test-time augmentation its scores used, the threshold chosen on which val split and by
which policy, and every metric with its bootstrap interval.

It lives in ``pneumo_models`` (below ``pneumo_eval``, which writes it) because the export job,
a ``pneumo_models`` job, reads it: imports run one way, data < models < eval. No TensorFlow
here. The robustness job writes a report of its own format under the same file name
(:data:`NAME`) in its own folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_data.common.errors import UserError
from pneumo_data.common.files import read_json

NAME = "report.json"
MARKDOWN = "report.md"

log = logging.getLogger("pneumo.report")


class ReportError(UserError):
    """A file that is not an evaluation report usable here; the message says why."""


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float; ValueError unless it is a number in [0, 1]."""
    if not (isinstance(threshold, (int, float, np.floating)) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


# ---------------------------------------------------------------- writing

def build(*, created: str, model: dict, data: dict, train_data: dict | None,
          cross_dataset: bool, model_input_size: int, warnings: list[str], threshold: dict,
          counts: dict, metrics: dict, bootstrap: dict, undefined: dict,
          subtype_sensitivity: dict, tta: str, calibration: dict | None,
          gradcam_examples: list, figures: dict, options: dict) -> dict[str, Any]:
    """The report's fields, in their order (``model`` names the file and its sha256,
    ``threshold`` the value, policy and the val split it was chosen on)."""
    return {
        "created": created, "model": model, "data": data, "train_data": train_data,
        "cross_dataset": cross_dataset, "model_input_size": model_input_size,
        "warnings": warnings, "threshold": threshold, "counts": counts, "metrics": metrics,
        "bootstrap": bootstrap, "undefined": undefined,
        "subtype_sensitivity": subtype_sensitivity, "tta": tta, "calibration": calibration,
        "gradcam_examples": gradcam_examples, "figures": figures, "options": options,
    }


def write(out, report: dict[str, Any], prefix: str = "") -> None:
    """Writes ``report.json`` and ``report.md`` (``prefix`` + name) through OutputDir ``out``."""
    out.write_text(prefix + NAME, json.dumps(report, indent=1) + "\n")
    out.write_text(prefix + MARKDOWN, markdown(report))


# ---------------------------------------------------------------- reading the threshold

@dataclasses.dataclass(frozen=True)
class Threshold:
    """The operating threshold a report chose, and what it belongs to."""

    value: float
    policy: str | None
    chosen_on: str | None
    data: str | None
    tta: str
    model_sha256: str | None   # the model file the report evaluated
    path: str                  # the report
    data_dir: str | None = None               # the data whose val split chose it
    data_splits: dict[str, str] | None = None  # that data's Manifest.split_digests()

    @property
    def source(self) -> str:
        """Where the threshold came from, in words (recorded by the exports)."""
        return f"{self.path}: policy {self.policy}, chosen on {self.chosen_on}"

    def check_model(self, sha256: str, what: str = "this model.keras") -> None:
        """Raises ReportError unless the report evaluated the model file of ``sha256``."""
        if self.model_sha256 is None:
            raise ReportError(f"--threshold_from {self.path} does not say which model file it "
                              f"evaluated (no model.file_sha256); evaluate this model first")
        if self.model_sha256 != sha256:
            raise ReportError(
                f"--threshold_from {self.path} evaluated another model file (sha256 "
                f"{self.model_sha256[:12]}..., {what} is {sha256[:12]}...); evaluate this "
                f"model first")

    def check_run(self, run_dir, record) -> None:
        """Raises ReportError when the threshold was chosen on the run's training data as it
        was *not* when the model trained on it (the folder was prepared again between
        training and the evaluation): its val split then held other images."""
        if not (self.data_dir and self.data_splits is not None
                and run_dir.is_training_data(self.data_dir, record)):
            return
        changed = sorted(split for split in set(record.data_splits) | set(self.data_splits)
                         if record.data_splits.get(split) != self.data_splits.get(split))
        if changed:
            raise ReportError(
                f"--threshold_from {self.path} chose its threshold on {self.data_dir} after it "
                f"was prepared again: its {', '.join(changed)} split(s) were not the ones "
                f"{run_dir.path} was trained on; evaluate the model on its own training data")


def read_threshold(path: str | Path) -> Threshold:
    """The threshold of evaluation report ``path`` (``--threshold_from``), checked; a user of
    it then checks that it belongs to its model (:meth:`Threshold.check_model`) and to the
    model's training data (:meth:`Threshold.check_run`)."""
    report = read_json(path, "--threshold_from")
    try:
        chosen = report["threshold"]
        value = chosen["value"]
    except (KeyError, TypeError):
        raise ReportError(f"--threshold_from {path} is not a {NAME} of pneumo_eval.evaluate "
                          f"(no threshold.value)") from None
    evaluated = (report.get("model") or {}).get("file_sha256") \
        if isinstance(report.get("model"), dict) else None
    try:
        value = check_threshold(value)
    except ValueError as error:
        raise ReportError(f"{path}: {error}") from None
    return Threshold(value=value, policy=chosen.get("policy"), chosen_on=chosen.get("chosen_on"),
                     data=chosen.get("data"), tta=report.get("tta", "none"),
                     model_sha256=evaluated, path=str(path), data_dir=chosen.get("data_dir"),
                     data_splits=chosen.get("data_splits"))


# ---------------------------------------------------------------- report.md

def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("estimate") is None:
        return "undefined"
    low, high = entry.get("low"), entry.get("high")
    ci = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
    return f"{entry['estimate']:.3f}{ci}"


def markdown(report: dict) -> str:
    """``report.md`` of a report."""
    th = report["threshold"]
    c = report["counts"]
    data, trained = report["data"], report.get("train_data")
    lines = [
        f"# Evaluation: {report['model']['name']} on {data.get('name', '')} {data['split']}",
        "",
        f"- Trained on: {trained['name']} ({trained['preset']}, stored {trained['stored_size']}"
        f" px, {trained['resize']}; {trained['dir']})" if trained else
        "- Trained on: unknown (run.json names no data)",
        f"- Evaluated on: {data.get('name', '')} {data['split']}: {data['images']} images, "
        f"{data['patients']} patients, {data['positives']} pneumonia (stored "
        f"{data.get('stored_size')} px, {data.get('resize')}, read at "
        f"{report.get('model_input_size')} px; {data['dir']})",
        f"- Threshold: {th['value']:.4f} by policy `{th['policy']}` on the val split of "
        f"{th.get('data')}, {th['note']} (on that val: sensitivity "
        f"{th['val_sensitivity']:.3f}, specificity {th['val_specificity']:.3f})",
        f"- Confusion: TN {c['tn']}, FP {c['fp']}, FN {c['fn']}, TP {c['tp']}",
        f"- 95% intervals: {report['bootstrap']['n_boot']} bootstrap replicates over "
        f"{report['bootstrap']['unit']}s",
        "",
        "| metric | value (95% CI) |",
        "|---|---|",
    ]
    for key, entry in report["metrics"].items():
        lines.append(f"| {key} | {_fmt(entry)} |")
    if report.get("tta", "none") != "none":
        at = next(i for i, line in enumerate(lines) if line.startswith("- Threshold:"))
        lines.insert(at + 1, f"- Test-time augmentation: `{report['tta']}` (the threshold was "
                             f"chosen on val with the same views)")
    lines += _calibration_lines(report.get("calibration"))
    if report["subtype_sensitivity"]:
        lines += ["", "| subtype | positives | detected | sensitivity |", "|---|---|---|---|"]
        for name, v in report["subtype_sensitivity"].items():
            lines.append(f"| {name} | {v['positives']} | {v['detected']} | "
                         f"{v['sensitivity']:.3f} |")
    if report.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in report["warnings"]]
    if report["undefined"]:
        lines += ["", "Undefined: " + "; ".join(f"{k}: {v}"
                                                for k, v in report["undefined"].items())]
    lines += ["", "Figures: " + ", ".join(f"[{k}]({v})" for k, v in report["figures"].items()),
              ""]
    return "\n".join(lines)


def _calibration_lines(calibration: dict | None) -> list[str]:
    if not calibration:
        return []
    if "undefined" in calibration:
        return ["", f"Calibration: undefined ({calibration['undefined']})"]
    lines = ["", f"Calibration, fitted on val (ECE over {calibration['bins']} equal-width bins; "
                 f"temperature T = {calibration['temperature']:.3f}, Platt a = "
                 f"{calibration['platt']['a']:.3f}, b = {calibration['platt']['b']:.3f}); "
                 f"a monotone map, so sensitivity and specificity at the val-chosen threshold "
                 f"do not change. A calibration fitted on val holds only at val's prevalence "
                 f"(fraction pneumonia below): on a population with another prevalence its "
                 f"probabilities are off even when the images are alike. The column after "
                 f"Platt + prior correction moves the Platt probabilities to the evaluated "
                 f"split's prevalence as estimated from its unlabelled scores (EM, Saerens et "
                 f"al. 2002):", "",
             "| split | ECE raw | after temperature | after Platt | after Platt + prior "
             "correction | mean probability | fraction pneumonia (estimated) |",
             "|---|---|---|---|---|---|---|"]
    for key, name in (("val", "val (fitted here)"), ("evaluated", "evaluated split")):
        c = calibration.get(key)
        if c:
            prior = f"{c['ece_platt_prior']:.3f}" if "ece_platt_prior" in c else "-"
            estimated = (f" ({c['estimated_prevalence']:.3f})" if "estimated_prevalence" in c
                         else "")
            lines.append(f"| {name} | {c['ece']:.3f} | {c['ece_temperature']:.3f} | "
                         f"{c['ece_platt']:.3f} | {prior} | {c['mean_probability']:.3f} | "
                         f"{c['positive_fraction']:.3f}{estimated} |")
    return lines


def comparison_markdown(reports: list[dict]) -> str:
    """The table of several models' reports (``comparison.md``)."""
    keys = ("roc_auc", "sensitivity", "specificity", "accuracy", "f1", "pr_auc", "brier")
    lines = ["| model | dir | threshold | " + " | ".join(keys) + " |",
             "|---" * (3 + len(keys)) + "|"]
    for r in reports:
        lines.append(f"| {r['model']['name']} | {Path(r['model']['dir']).name} | "
                     f"{r['threshold']['value']:.3f} ({r['threshold']['policy']}) | "
                     + " | ".join(_fmt(r["metrics"].get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"
