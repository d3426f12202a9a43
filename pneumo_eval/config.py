"""The configs and errors of the evaluation jobs (no TensorFlow here, so the jobs check their
flags, folders and files before TensorFlow loads). Every leaf field is also a flag of its job.
"""

from __future__ import annotations

import dataclasses

from pneumo_data.common.config import option
from pneumo_data.common.errors import UserError

TTA_MODES = ("none", "flip", "flip_scale")  # see pneumo_eval.tta


class EvaluateError(UserError):
    """The evaluation cannot run with these inputs; the message says why."""


class PredictError(UserError):
    """The prediction job cannot run with these inputs; the message says why."""


class RobustnessError(UserError):
    """The robustness evaluation cannot run with these inputs; the message says why."""


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


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    model_dir: str | None = option(None, "A training model_dir (its model.keras is used unless "
                                          "--model).")
    model: str | None = option(None, "A .keras file, a SavedModel folder (pneumo_models.export) "
                                     "or a .tflite file (default: MODEL_DIR/model.keras).")
    input: str | None = option(None, "An image file or a folder (searched recursively).")
    output: str = option("predictions.csv", "CSV to write.")
    threshold: float | None = option(None, "Decision threshold (default: the exported one of a "
                                           "SavedModel or .tflite, else 0.5; not with "
                                           "--threshold_from).")
    threshold_from: str | None = option(None, "A report.json from pneumo_eval.evaluate whose "
                                              "chosen threshold to use (not with --threshold).")
    stored_size: int = option(0, "Keras models: the size the training images were stored at "
                                 "(0: from the model's data manifest).")
    resize: str | None = option(None, "Keras models: how they were resized to it, stretch or "
                                      "pad (default: from the manifest, else stretch).")
    batch_size: int = option(32, "Prediction batch size.")
    tta: str = option("none", "Test-time augmentation: none, flip or flip_scale (see "
                              "pneumo_eval.evaluate --tta).", choices=TTA_MODES)


@dataclasses.dataclass(frozen=True)
class RobustnessConfig:
    """Options of the robustness job; each field is also a command-line flag."""

    model_dir: str | None = option(None, "A finished training model_dir (model.keras, run.json).")
    split: str = option("val", "Split whose images are shifted.")
    data_dir: str | None = option(None, "Prepared shards (default: the model's training data, "
                                        "from its run.json).")
    threshold_from: str | None = option(
        None, "A report.json of pneumo_eval.evaluate for this model: use its threshold (default: "
              "the exported one, else chosen on val by --threshold_policy).")
    threshold_policy: str = option("youden", "fixed[:T], youden or sensitivity:S, applied to the "
                                             "val split of the training data when neither "
                                             "--threshold_from nor an exported threshold is "
                                             "there.")
    shifts: tuple[str, ...] | None = option(None, "Shifts to run (comma-separated; default: all "
                                                  "15).")
    output_dir: str | None = option(None, "Where the report goes (default: "
                                          "MODEL_DIR/robustness-SPLIT).")
    seed: int = option(0, "Seed of the random parts of the shifts (noise, mark positions).")
    batch_size: int = option(64, "Prediction batch size.")
