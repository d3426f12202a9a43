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

The work is :mod:`pneumo_eval.evaluation`'s; the report's format is :mod:`pneumo_models.report`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import OutputDir
from pneumo_eval.config import EvaluateConfig, EvaluateError
from pneumo_eval.thresholds import parse_policy
from pneumo_models import report as report_lib
from pneumo_models.rundir import RunDir

log = logging.getLogger("pneumo.evaluate")

__all__ = ["EvaluateConfig", "EvaluateError", "evaluate"]


def evaluate(config: EvaluateConfig) -> list[dict[str, Any]]:
    if not config.model_dir:
        raise EvaluateError("--model_dir is required")
    if config.bootstrap < 1 or config.batch_size < 1 or config.gradcam_examples < 0:
        raise EvaluateError("bootstrap and batch_size must be positive, gradcam_examples >= 0")
    try:
        parse_policy(config.threshold_policy)
    except ValueError as error:
        raise EvaluateError(str(error)) from None
    dirs = [Path(d) for d in config.model_dir]
    for d in dirs:  # every model, its data and the split, before anything is written
        RunDir(d).evaluation_data(config.data_dir, config.split, EvaluateError)
    several = len(dirs) > 1
    if several and not config.output_dir:
        raise EvaluateError("several --model_dir need an --output_dir for the reports and "
                            "the comparison")
    if several and len({d.name for d in dirs}) < len(dirs):
        raise EvaluateError("the model_dirs must have different folder names (each gets a "
                            "subfolder of --output_dir named after it)")
    target = Path(config.output_dir) if config.output_dir \
        else RunDir(dirs[0]).eval_dir(config.split)
    reports = []
    with OutputDir(target, job="evaluate") as out:  # locked before TensorFlow loads
        # The job's TensorFlow half, loaded once the options and folders have been checked.
        import_tensorflow()
        from pneumo_eval.evaluation import evaluate_model

        if not several:
            log.info("evaluating %s on %s -> %s", dirs[0], config.split, out.path)
            reports.append(evaluate_model(dirs[0], config, out))
            print(report_lib.markdown(reports[-1]), flush=True)
            return reports
        for d in dirs:
            out.subdir(d.name)
            log.info("evaluating %s on %s -> %s", d, config.split, out.path / d.name)
            reports.append(evaluate_model(d, config, out, prefix=f"{d.name}/"))
            print(report_lib.markdown(reports[-1]), flush=True)
        out.write_text("comparison.md", report_lib.comparison_markdown(reports))
        out.write_text("comparison.json", json.dumps(reports, indent=1) + "\n")
    print(report_lib.comparison_markdown(reports))
    return reports


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("evaluate", EvaluateConfig, evaluate)
