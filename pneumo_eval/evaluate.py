r"""Evaluation job: a trained model on a held-out split, honestly.

    python -m pneumo_eval.evaluate --model_dir=runs/cnn --split=test \
        --threshold_policy=sensitivity:0.95 --output_dir=reports/cnn
    # several models side by side (writes comparison.md / comparison.json too):
    python -m pneumo_eval.evaluate --model_dir=runs/cnn,runs/vgg16 --output_dir=reports/cmp
    # across datasets: trained on A (run.json's data), evaluated on B's test split; the
    # threshold is still chosen on A's val split (--threshold_data=target: on B's val)
    python -m pneumo_eval.evaluate --model_dir=runs/cnn --data_dir=data/rsna --split=test \
        --output_dir=reports/cnn-on-rsna

The operating threshold is chosen on a validation split by the policy
(:mod:`pneumo_eval.thresholds`) and applied unchanged to ``--split``: by default the val split of
the data the model was trained on (its ``run.json``), also when ``--data_dir`` names another
dataset, so that a cross-dataset number is a transfer number, not one re-tuned on the target.
B is read at the model's input size whatever size it was stored at; the report names both
datasets and warns when B's geometry differs from A's (pad vs stretch, upsampling), when their
label rules differ, and when the evaluated images also occur in A's train or val split. Writes,
per model, ``report.json`` (every metric with its 95% bootstrap interval over
patients, counts, threshold and policy, per-subtype sensitivity, model and data
identity), ``report.md`` and PNGs: confusion matrix, ROC with the operating
point, precision-recall, calibration, score histograms and Grad-CAM for a few
true positives, false positives and false negatives.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_data.common.config import config_to_dict, option
from pneumo_data.common.errors import UserError
from pneumo_data.common.files import file_sha256, read_json
from pneumo_data.common.outputs import OutputDir
from pneumo_eval import metrics as metrics_lib
from pneumo_eval.tta import MODES as TTA_MODES

log = logging.getLogger("pneumo.evaluate")


class EvaluateError(UserError):
    """The evaluation cannot run with these inputs; the message says why."""


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Options of the evaluation job; each field is also a command-line flag."""

    model_dir: tuple[str, ...] | None = option(None, "One or more training model_dirs "
                                                     "(comma-separated).")
    data_dir: str | None = option(None, "Prepared shards (default: the one each model "
                                        "was trained on, from its run.json).")
    split: str = option("test", "Split to evaluate.")
    threshold_policy: str = option("youden", "fixed[:T], youden or sensitivity:S; chosen "
                                             "on a val split (see --threshold_data).")
    threshold_data: str = option(
        "source", "Val split the threshold is chosen on: source = the data the model was "
                  "trained on (run.json), also when --data_dir is another dataset; target = "
                  "--data_dir's val (re-tuned on the evaluated dataset: it peeks at the target "
                  "domain, so the result is not a transfer number).",
        choices=("source", "target"))
    output_dir: str | None = option(None, "Where reports go (default: MODEL_DIR/eval-SPLIT; "
                                          "required for several models).")
    bootstrap: int = option(1000, "Bootstrap replicates for the 95% intervals.")
    gradcam_examples: int = option(3, "Grad-CAM examples per kind (TP, FP, FN); 0: none.")
    batch_size: int = option(64, "Prediction batch size.")
    seed: int = option(0, "Seed of the bootstrap.")
    tta: str = option("none", "Test-time augmentation: none, flip (mean over the image and its "
                              "mirror) or flip_scale (and sampling scales 0.9 and 1.1: six "
                              "views); the threshold is chosen on val with the same views.",
                      choices=TTA_MODES)


@dataclasses.dataclass
class Predictions:
    labels: np.ndarray
    scores: np.ndarray
    patients: np.ndarray
    subtypes: np.ndarray
    paths: np.ndarray


def predict_split(model, data_dir, split: str, batch_size: int, tta: str = "none"
                  ) -> Predictions:
    """The model's scores of every image of ``split`` (mean over the ``tta`` views)."""
    import pneumo_data
    from pneumo_eval.tta import tta_scores
    from pneumo_models.models import predictor
    size = int(model.inputs[0].shape[1])
    ds = pneumo_data.eval_dataset(data_dir, split, batch_size=batch_size, image_size=size,
                                  with_metadata=True)
    score = predictor(model)  # graph execution, as the exports run it
    labels, scores, patients, subtypes, paths = [], [], [], [], []
    for images, y, meta in ds:
        scores.append(tta_scores(score, images.numpy(), tta))
        labels.append(y.numpy()[:, 0].astype(np.int64))
        patients += [p.decode() for p in meta["patient_id"].numpy()]
        subtypes += [p.decode() for p in meta["subtype"].numpy()]
        paths += [p.decode() for p in meta["source_path"].numpy()]
    if not labels:
        raise EvaluateError(f"split {split!r} of {data_dir} holds no images")
    return Predictions(np.concatenate(labels), np.concatenate(scores), np.array(patients),
                       np.array(subtypes), np.array(paths))


def _pick_examples(pred: Predictions, threshold: float, k: int) -> list[tuple[str, int]]:
    """Most confident true positives, false positives and false negatives."""
    positive = pred.scores >= threshold
    kinds = {
        "TP": np.flatnonzero(positive & (pred.labels == 1)),
        "FP": np.flatnonzero(positive & (pred.labels == 0)),
        "FN": np.flatnonzero(~positive & (pred.labels == 1)),
    }
    chosen = []
    for kind, idx in kinds.items():
        confidence = pred.scores[idx] if kind != "FN" else 1 - pred.scores[idx]
        for i in idx[np.argsort(-confidence, kind="stable")][:k]:
            chosen.append((kind, int(i)))
    return chosen


def _gradcam(model, data_dir, split, pred, threshold, k, path: Path) -> list[dict]:
    if k <= 0:
        return []
    import pneumo_data
    from pneumo_eval import gradcam, plots
    chosen = _pick_examples(pred, threshold, k)
    if not chosen:
        return []
    size = int(model.inputs[0].shape[1])
    wanted = {i for _, i in chosen}
    images = {}
    offset = 0
    for batch, _ in pneumo_data.eval_dataset(data_dir, split, batch_size=256, image_size=size):
        for j in range(len(batch)):
            if offset + j in wanted:
                images[offset + j] = batch[j].numpy()
        offset += len(batch)
    stack = np.stack([images[i] for _, i in chosen])
    heat = gradcam.grad_cam(model, stack)
    captions = [f"{kind} p={pred.scores[i]:.2f}\n{Path(pred.paths[i]).name}"
                for kind, i in chosen]
    plots.gradcam_png(stack, heat, captions, path,
                      title=f"Grad-CAM ({gradcam.last_conv_layer(model)[1]})")
    return [{"kind": kind, "path": str(pred.paths[i]), "score": float(pred.scores[i])}
            for kind, i in chosen]


def _run_record(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "run.json"
    return read_json(path, "run record") if path.exists() else {}


def trained_model_and_data(model_dir: Path, data_dir: str | None, split: str,
                           error: type[UserError] = UserError):
    """(model.keras path, run record, the training data folder or None, the data folder to
    read: ``data_dir`` or the training one, its manifest) of a finished training run, with
    ``split`` checked to exist and hold images; ``error`` says what is missing."""
    from pneumo_data import manifest as manifest_lib
    from pneumo_models.train import run_data_dir
    model_path = model_dir / "model.keras"
    if not model_path.exists():
        raise error(f"{model_dir} has no model.keras (is the training finished?)")
    run = _run_record(model_dir)
    train_dir = run_data_dir(model_dir, run)
    data_dir = Path(data_dir) if data_dir else train_dir
    if data_dir is None:
        raise error(f"no --data_dir given and {model_dir}/run.json names none")
    m = manifest_lib.load_manifest(data_dir)
    m.require_split(split)
    if m.count(split) == 0:
        raise error(f"split {split!r} of {data_dir} holds no images")
    return model_path, run, train_dir, data_dir, m


def evaluate_model(model_dir: Path, config: EvaluateConfig, out: OutputDir, prefix: str = ""
                   ) -> dict[str, Any]:
    """Evaluates one model; writes its report files as ``prefix + name`` into ``out``."""
    from pneumo_data import manifest as manifest_lib
    from pneumo_eval import plots
    from pneumo_eval.bootstrap import bootstrap_intervals
    from pneumo_eval.calibration import calibration_report
    from pneumo_eval.thresholds import choose_threshold
    from pneumo_models.models import load_model

    model_path, run, train_dir, data_dir, m = trained_model_and_data(
        model_dir, config.data_dir, config.split, EvaluateError)
    cross = train_dir is None or Path(data_dir).resolve() != Path(train_dir).resolve()
    if cross and config.threshold_data == "source":
        if train_dir is None:
            raise EvaluateError(
                f"{model_dir}/run.json names no training data to choose the threshold on; "
                f"pass --threshold_data=target (chosen on {data_dir}'s val split)")
        try:
            train_m = manifest_lib.load_manifest(train_dir)
        except manifest_lib.ManifestError as error:
            raise EvaluateError(
                f"the model's training data is needed to choose the threshold ({error}); "
                f"restore it, or pass --threshold_data=target") from None
        threshold_m = train_m
    else:
        train_m = _try_manifest(train_dir) if cross else m
        threshold_m = m
    if "val" not in threshold_m.splits or threshold_m.count("val") == 0:
        raise EvaluateError(f"{threshold_m.data_dir} has no val images to choose the "
                            f"threshold on")
    model = load_model(model_path)
    model_size = int(model.inputs[0].shape[1])

    val = predict_split(model, threshold_m.data_dir, "val", config.batch_size, config.tta)
    try:
        choice = choose_threshold(val.labels, val.scores, config.threshold_policy,
                                  chosen_on="val")
    except ValueError as error:
        raise EvaluateError(f"cannot choose a threshold on the val split of "
                            f"{threshold_m.data_dir}: {error}") from None
    pred = val if config.split == "val" and threshold_m is m else predict_split(
        model, data_dir, config.split, config.batch_size, config.tta)
    t = choice.threshold
    point = metrics_lib.binary_metrics(pred.labels, pred.scores, t)
    intervals = bootstrap_intervals(pred.labels, pred.scores, t, groups=pred.patients,
                                    n_boot=config.bootstrap, seed=config.seed)
    subtypes = metrics_lib.subtype_sensitivity(pred.labels, pred.scores, pred.subtypes, t)
    if set(subtypes) <= {"unknown"}:
        subtypes = {}  # a CSV source says pneumonia, not which kind: nothing to break down
    calibration = calibration_report(val.labels, val.scores, pred.labels, pred.scores)
    eval_info = dataset_info(m, config.split)
    train_info = dataset_info(train_m) if train_m is not None else None
    warnings_ = cross_dataset_warnings(train_m, m, config.split, model_size) if cross else []
    for warning in warnings_:
        log.warning("%s", warning)
    figures = {}
    name = run.get("model", model_dir.name)

    def figure(key: str, filename: str) -> Path:
        figures[key] = filename
        return out.claim(prefix + filename)

    plots.confusion_matrix_png(pred.labels, pred.scores, t,
                               figure("confusion_matrix", "confusion_matrix.png"))
    if len(np.unique(pred.labels)) == 2:
        plots.roc_png(pred.labels, pred.scores, t, point["roc_auc"], figure("roc", "roc.png"),
                      title=f"ROC, {name}, {config.split}")
    if pred.labels.sum() > 0:
        plots.pr_png(pred.labels, pred.scores, point["pr_auc"], figure("pr", "pr.png"))
    plots.calibration_png(pred.labels, pred.scores, point["brier"],
                          figure("calibration", "calibration.png"))
    plots.histogram_png(pred.labels, pred.scores, t, figure("histogram", "score_histogram.png"))
    if config.gradcam_examples > 0:
        examples = _gradcam(model, data_dir, config.split, pred, t, config.gradcam_examples,
                            out.claim(prefix + "gradcam.png"))
        if examples:
            figures["gradcam"] = "gradcam.png"
    else:
        examples = []
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"dir": str(model_dir), "name": name,
                  "file_sha256": file_sha256(model_path), "precision": run.get("precision"),
                  "trained": {k: run.get(k) for k in ("tensorflow", "keras", "train_counts")}},
        "data": {**eval_info, "split": config.split,
                 "images": int(pred.labels.size), "patients": int(len(set(pred.patients))),
                 "positives": int(pred.labels.sum())},
        "train_data": train_info,
        "cross_dataset": cross,
        "model_input_size": model_size,
        "warnings": warnings_,
        "threshold": {"policy": choice.policy, "value": t, "chosen_on": choice.chosen_on,
                      "data": threshold_m.data.get("source", {}).get("dataset_name")
                      or Path(threshold_m.data_dir).name,
                      "data_dir": str(threshold_m.data_dir),
                      "val_sensitivity": choice.sensitivity,
                      "val_specificity": choice.specificity,
                      "note": _threshold_note(config, cross, threshold_m is m)},
        "counts": {k: point[k] for k in ("tn", "fp", "fn", "tp")},
        "metrics": {k: v for k, v in intervals.items() if k != "_meta"},
        "bootstrap": intervals["_meta"],
        "undefined": metrics_lib.undefined_reasons(point),
        "subtype_sensitivity": subtypes,
        "tta": config.tta,
        "calibration": calibration,
        "gradcam_examples": examples,
        "figures": figures,
        "options": config_to_dict(config),
    }
    report = metrics_lib.json_ready(report)
    out.write_text(prefix + "report.json", json.dumps(report, indent=1) + "\n")
    out.write_text(prefix + "report.md", report_markdown(report))
    with out.replacing(prefix + "predictions.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, labels=pred.labels, scores=pred.scores,
                                patients=pred.patients, subtypes=pred.subtypes, paths=pred.paths)
    return report


def _try_manifest(data_dir):
    from pneumo_data import manifest as manifest_lib
    if data_dir is None:
        return None
    try:
        return manifest_lib.load_manifest(data_dir)
    except manifest_lib.ManifestError:
        return None


def dataset_info(m, split: str | None = None) -> dict[str, Any]:
    """How a report names a prepared dataset: name, preset, where, stored geometry, labels."""
    from pneumo_data import manifest as manifest_lib
    source = m.data.get("source", {})
    info = {"name": source.get("dataset_name") or Path(m.data_dir).name,
            "preset": source.get("preset", "kaggle"),
            "dir": str(m.data_dir),
            "manifest_created": m.data["created"],
            "manifest_sha256": file_sha256(Path(m.data_dir) / manifest_lib.MANIFEST_NAME),
            "stored_size": m.image_size,
            "resize": m.data["image"].get("resize"),
            "label_options": source.get("label_options"),
            "counts": m.data["counts"]}
    if split is not None and source.get("views", {}).get(split):
        info["views"] = source["views"][split]
    return info


# The RSNA challenge images are a re-annotated subset of NIH ChestX-ray14 (Shih et al.,
# Radiology: AI 2019), re-encoded: content hashes cannot see the overlap.
_RELATED = {frozenset(("rsna", "nih")): "the RSNA challenge images are a re-annotated subset of "
                                        "NIH ChestX-ray14 (Shih et al. 2019), re-encoded as "
                                        "DICOM: this is not an independent test set"}


def cross_dataset_warnings(train_m, eval_m, split: str, model_size: int) -> list[str]:
    """What makes a model-on-another-dataset number hard to read, one sentence each."""
    out = []
    eval_size, eval_resize = eval_m.image_size, eval_m.data["image"].get("resize")
    if eval_size < model_size:
        out.append(f"upsampled: {eval_m.data_dir} is stored at {eval_size} px and read at the "
                   f"model's {model_size} px, so the model sees blurrier images than sharp "
                   f"ones of that size; prepare it again with --image_size={model_size} or more")
    if train_m is None:
        out.append("the model's training data is unknown (no run.json data_dir): geometry and "
                   "label rules cannot be compared")
        return out
    train_resize = train_m.data["image"].get("resize")
    if train_resize != eval_resize:
        out.append(f"geometry differs: the training data was resized with --resize="
                   f"{train_resize}, the evaluated data with --resize={eval_resize}; prepare "
                   f"both the same way to compare the images and not the padding")
    train_rule, eval_rule = (_label_rule(m.data.get("source", {}).get("label_options"))
                             for m in (train_m, eval_m))
    if train_rule != eval_rule:
        out.append(f"label rules differ: trained on {train_rule}, evaluated on {eval_rule}; "
                   f"'normal' may not mean the same in both")
    used = {r["sha256"] for r in train_m.data["files"]
            if r.get("status") == "written" and r.get("split") in ("train", "val")}
    shared = sum(1 for r in eval_m.data["files"] if r.get("status") == "written"
                 and r.get("split") == split and r.get("sha256") in used)
    if shared:
        out.append(f"overlap: {shared} evaluated image(s) are byte-identical to images of the "
                   f"model's train or val split")
    presets = frozenset(m.data.get("source", {}).get("preset") for m in (train_m, eval_m))
    if presets in _RELATED:
        out.append(f"related datasets: {_RELATED[presets]}")
    return out


def _label_rule(options: dict | None) -> str:
    """The label rule of a manifest's ``source.label_options``, in words."""
    if not options or "positive_values" not in options:
        return "folder names (NORMAL vs PNEUMONIA)"
    negative = options.get("negative_values") or "every other value"
    dropped = f", dropping {options['drop_values']}" if options.get("drop_values") else ""
    return (f"{options.get('label_column')} in {options.get('positive_values')} vs "
            f"{negative}{dropped}")


def _threshold_note(config: EvaluateConfig, cross: bool, on_target: bool) -> str:
    if config.split == "val" and on_target:
        return "chosen and applied on the same split: optimistic"
    if cross and on_target:
        return ("chosen on the evaluated dataset's val split (--threshold_data=target): "
                "re-tuned on the target domain, not a transfer number")
    if cross:
        return "chosen on the training data's val split, applied unchanged to another dataset"
    return "chosen on val, applied unchanged"


def _fmt(entry: dict | None) -> str:
    if not entry or entry.get("estimate") is None:
        return "undefined"
    low, high = entry.get("low"), entry.get("high")
    ci = f" ({low:.3f}-{high:.3f})" if low is not None and high is not None else ""
    return f"{entry['estimate']:.3f}{ci}"


def report_markdown(report: dict) -> str:
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
    for key in metrics_lib.METRICS:
        lines.append(f"| {key} | {_fmt(report['metrics'].get(key))} |")
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
                 f"do not change:", "",
             "| split | ECE raw | after temperature | after Platt | mean probability | "
             "fraction pneumonia |", "|---|---|---|---|---|---|"]
    for key, name in (("val", "val (fitted here)"), ("evaluated", "evaluated split")):
        c = calibration.get(key)
        if c:
            lines.append(f"| {name} | {c['ece']:.3f} | {c['ece_temperature']:.3f} | "
                         f"{c['ece_platt']:.3f} | {c['mean_probability']:.3f} | "
                         f"{c['positive_fraction']:.3f} |")
    return lines


def comparison_markdown(reports: list[dict]) -> str:
    keys = ("roc_auc", "sensitivity", "specificity", "accuracy", "f1", "pr_auc", "brier")
    lines = ["| model | dir | threshold | " + " | ".join(keys) + " |",
             "|---" * (3 + len(keys)) + "|"]
    for r in reports:
        lines.append(f"| {r['model']['name']} | {Path(r['model']['dir']).name} | "
                     f"{r['threshold']['value']:.3f} ({r['threshold']['policy']}) | "
                     + " | ".join(_fmt(r["metrics"].get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def evaluate(config: EvaluateConfig) -> list[dict[str, Any]]:
    if not config.model_dir:
        raise EvaluateError("--model_dir is required")
    if config.bootstrap < 1 or config.batch_size < 1 or config.gradcam_examples < 0:
        raise EvaluateError("bootstrap and batch_size must be positive, gradcam_examples >= 0")
    from pneumo_eval.thresholds import parse_policy
    try:
        parse_policy(config.threshold_policy)
    except ValueError as error:
        raise EvaluateError(str(error)) from None
    dirs = [Path(d) for d in config.model_dir]
    for d in dirs:
        if not (d / "model.keras").exists():
            raise EvaluateError(f"{d} has no model.keras (is the training finished?)")
    several = len(dirs) > 1
    if several and not config.output_dir:
        raise EvaluateError("several --model_dir need an --output_dir for the reports and "
                            "the comparison")
    if several and len({d.name for d in dirs}) < len(dirs):
        raise EvaluateError("the model_dirs must have different folder names (each gets a "
                            "subfolder of --output_dir named after it)")
    reports = []
    if several:
        with OutputDir(config.output_dir, job="evaluate") as out:
            for d in dirs:
                out.subdir(d.name)
                log.info("evaluating %s on %s -> %s", d, config.split, out.path / d.name)
                reports.append(evaluate_model(d, config, out, prefix=f"{d.name}/"))
                print(report_markdown(reports[-1]), flush=True)
            out.write_text("comparison.md", comparison_markdown(reports))
            out.write_text("comparison.json", json.dumps(reports, indent=1) + "\n")
        print(comparison_markdown(reports))
        return reports
    target = Path(config.output_dir) if config.output_dir else dirs[0] / f"eval-{config.split}"
    with OutputDir(target, job="evaluate") as out:
        log.info("evaluating %s on %s -> %s", dirs[0], config.split, out.path)
        reports.append(evaluate_model(dirs[0], config, out))
    print(report_markdown(reports[-1]), flush=True)
    return reports


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("evaluate", EvaluateConfig, evaluate)
