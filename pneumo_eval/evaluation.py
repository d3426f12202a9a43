"""Evaluating a trained model on a split: the library behind ``python -m pneumo_eval.evaluate``
(:mod:`pneumo_eval.evaluate` is the job; the report's format is
:mod:`pneumo_models.report`).

:func:`evaluate_model` scores the val split (where the threshold is chosen) and the evaluated
split, computes every metric with its bootstrap interval over patients, the calibration, the
per-subtype sensitivity, the cross-dataset warnings, the figures and Grad-CAM, and writes the
report. :func:`predict_split` and :func:`dataset_info` serve the robustness job too.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pneumo_data import manifest as manifest_lib
from pneumo_data import reader
from pneumo_data.common.config import config_to_dict
from pneumo_data.common.files import file_sha256
from pneumo_data.common.outputs import OutputDir
from pneumo_eval import gradcam as gradcam_lib
from pneumo_eval import metrics as metrics_lib
from pneumo_eval import plots
from pneumo_eval.bootstrap import bootstrap_intervals
from pneumo_eval.calibration import calibration_report
from pneumo_eval.config import EvaluateError
from pneumo_eval.thresholds import choose_threshold
from pneumo_eval.tta import tta_scores
from pneumo_models import report as report_lib
from pneumo_models.models import load_model, predictor
from pneumo_models.rundir import RunDir

log = logging.getLogger("pneumo.evaluate")


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
    size = int(model.inputs[0].shape[1])
    ds = reader.eval_dataset(data_dir, split, batch_size=batch_size, image_size=size,
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
    chosen = _pick_examples(pred, threshold, k)
    if not chosen:
        return []
    size = int(model.inputs[0].shape[1])
    wanted = {i for _, i in chosen}
    images = {}
    offset = 0
    for batch, _ in reader.eval_dataset(data_dir, split, batch_size=256, image_size=size):
        for j in range(len(batch)):
            if offset + j in wanted:
                images[offset + j] = batch[j].numpy()
        offset += len(batch)
    stack = np.stack([images[i] for _, i in chosen])
    heat = gradcam_lib.grad_cam(model, stack)
    captions = [f"{kind} p={pred.scores[i]:.2f}\n{Path(pred.paths[i]).name}"
                for kind, i in chosen]
    plots.gradcam_png(stack, heat, captions, path,
                      title=f"Grad-CAM ({gradcam_lib.last_conv_layer(model)[1]})")
    return [{"kind": kind, "path": str(pred.paths[i]), "score": float(pred.scores[i])}
            for kind, i in chosen]


def evaluate_model(model_dir: Path, config, out: OutputDir, prefix: str = "") -> dict[str, Any]:
    """Evaluates one model under an :class:`pneumo_eval.evaluate.EvaluateConfig`; writes its
    report files as ``prefix + name`` into ``out``."""
    run_dir = RunDir(model_dir)
    record, train_dir, data_dir, m = run_dir.evaluation_data(config.data_dir, config.split,
                                                              EvaluateError)
    run = record.to_dict() if record is not None else {}
    model_path = run_dir.model_path
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
        if record is not None:
            run_dir.check_data(train_m, record, EvaluateError)
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
    report = report_lib.build(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        model={"dir": str(model_dir), "name": name,
               "file_sha256": file_sha256(model_path), "precision": run.get("precision"),
               "trained": {k: run.get(k) for k in ("tensorflow", "keras", "train_counts")}},
        data={**eval_info, "split": config.split,
              "images": int(pred.labels.size), "patients": int(len(set(pred.patients))),
              "positives": int(pred.labels.sum())},
        train_data=train_info,
        cross_dataset=cross,
        model_input_size=model_size,
        warnings=warnings_,
        threshold={"policy": choice.policy, "value": t, "chosen_on": choice.chosen_on,
                   "data": threshold_m.data.get("source", {}).get("dataset_name")
                   or Path(threshold_m.data_dir).name,
                   "data_dir": str(threshold_m.data_dir),
                   "data_splits": threshold_m.split_digests(),
                   "val_sensitivity": choice.sensitivity,
                   "val_specificity": choice.specificity,
                   "note": _threshold_note(config, cross, threshold_m is m)},
        counts={k: point[k] for k in ("tn", "fp", "fn", "tp")},
        metrics={k: v for k, v in intervals.items() if k != "_meta"},
        bootstrap=intervals["_meta"],
        undefined=metrics_lib.undefined_reasons(point),
        subtype_sensitivity=subtypes,
        tta=config.tta,
        calibration=calibration,
        gradcam_examples=examples,
        figures=figures,
        options=config_to_dict(config),
    )
    report = metrics_lib.json_ready(report)
    report_lib.write(out, report, prefix)
    with out.replacing(prefix + "predictions.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, labels=pred.labels, scores=pred.scores,
                                patients=pred.patients, subtypes=pred.subtypes, paths=pred.paths)
    return report


def _try_manifest(data_dir):
    if data_dir is None:
        return None
    try:
        return manifest_lib.load_manifest(data_dir)
    except manifest_lib.ManifestError:
        return None


def dataset_info(m, split: str | None = None) -> dict[str, Any]:
    """How a report names a prepared dataset: name, preset, where, stored geometry, labels."""
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


def _threshold_note(config, cross: bool, on_target: bool) -> str:
    if config.split == "val" and on_target:
        return "chosen and applied on the same split: optimistic"
    if cross and on_target:
        return ("chosen on the evaluated dataset's val split (--threshold_data=target): "
                "re-tuned on the target domain, not a transfer number")
    if cross:
        return "chosen on the training data's val split, applied unchanged to another dataset"
    return "chosen on val, applied unchanged"
