"""Report figures as PNG files (matplotlib, Agg backend), each written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumo_data.common.files import replacing
from pneumo_eval.metrics import confusion


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return Path(path)


def confusion_matrix_png(y, s, threshold: float, path, title: str = "") -> Path:
    plt = _plt()
    c = confusion(np.asarray(y), np.asarray(s), threshold)
    grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(grid, cmap="Blues")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v}", ha="center", va="center", fontsize=13,
                color="white" if v > grid.max() / 2 else "black")
    ax.set_xticks([0, 1], ["normal", "pneumonia"])
    ax.set_yticks([0, 1], ["normal", "pneumonia"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"Confusion matrix at threshold {threshold:.3f}", fontsize=10)
    return _save(fig, path)


def roc_png(y, s, threshold: float, auc: float, path, title: str = "") -> Path:
    plt = _plt()
    fpr, tpr, _ = roc_curve(y, s)
    c = confusion(np.asarray(y), np.asarray(s), threshold)
    op_fpr = c["fp"] / max(c["fp"] + c["tn"], 1)
    op_tpr = c["tp"] / max(c["tp"] + c["fn"], 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="chance")
    ax.plot([op_fpr], [op_tpr], "o", color="crimson",
            label=f"operating point t={threshold:.3f}\nsens {op_tpr:.3f}, spec {1 - op_fpr:.3f}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title or "ROC curve", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_png(y, s, ap: float, path, title: str = "") -> Path:
    plt = _plt()
    precision, recall, _ = precision_recall_curve(y, s)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.step(recall, precision, where="post", label=f"average precision {ap:.3f}")
    ax.axhline(np.mean(y), ls="--", color="grey", lw=0.8, label="prevalence")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "Precision-recall curve", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def calibration_png(y, s, brier: float, path, bins: int = 10, title: str = "") -> Path:
    plt = _plt()
    frac, mean = calibration_curve(y, s, n_bins=bins, strategy="uniform")
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8, label="perfect calibration")
    ax.plot(mean, frac, "o-", label=f"model (Brier {brier:.3f})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction of pneumonia")
    ax.set_title(title or "Calibration (reliability) diagram", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def histogram_png(y, s, threshold: float, path, title: str = "") -> Path:
    plt = _plt()
    y, s = np.asarray(y), np.asarray(s)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    bins = np.linspace(0, 1, 26)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label=f"normal (n={int((y == 0).sum())})")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label=f"pneumonia (n={int((y == 1).sum())})")
    ax.axvline(threshold, color="crimson", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("predicted pneumonia probability")
    ax.set_ylabel("images")
    ax.set_title(title or "Scores per class", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def gradcam_png(images, heatmaps, captions, path, title: str = "") -> Path:
    """A row of X-rays with their Grad-CAM heatmaps overlaid."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(3 * max(n, 1), 3.4), squeeze=False)
    for ax, image, heat, caption in zip(axes[0], images, heatmaps, captions):
        ax.imshow(np.asarray(image)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(caption, fontsize=7)
        ax.axis("off")
    for ax in axes[0][n:]:
        ax.axis("off")
    fig.suptitle(title or "Grad-CAM", fontsize=9)
    return _save(fig, path)


def robustness_png(report: dict, path, title: str = "") -> Path:
    """AUC, sensitivity and specificity (at the report's threshold) per shift and severity,
    as three heat maps side by side with the clean value in the first column."""
    plt = _plt()
    conditions = report["conditions"]
    shifts = list(dict.fromkeys(c["shift"] for c in conditions))
    severities = sorted({c["severity"] for c in conditions})
    keys = (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"),
            ("specificity", "specificity"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.42 * len(shifts) + 1.8), sharey=True)
    for ax, (key, label) in zip(axes, keys):
        grid = np.full((len(shifts), 1 + len(severities)), np.nan)
        clean = report["clean"].get(key)
        grid[:, 0] = np.nan if clean is None else clean
        for c in conditions:
            if c[key] is not None:
                grid[shifts.index(c["shift"]), 1 + severities.index(c["severity"])] = c[key]
        low = 0.5 if key == "roc_auc" else 0.0
        ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=low, vmax=1.0, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                    fontsize=7)
        ax.set_xticks(range(1 + len(severities)), ["clean"] + [str(s) for s in severities])
        ax.set_xlabel("severity")
        ax.set_title(label if key == "roc_auc" else
                     f"{label} at t={report['threshold']['value']:.3f}", fontsize=9)
    axes[0].set_yticks(range(len(shifts)), shifts, fontsize=8)
    h = report["headline"]
    worst = h.get("worst_specificity") or {}
    fig.suptitle(title or (
        f"{report['model']['name']} on {report['data']['split']}: mean AUC over shifts "
        f"{h['mean_auc']:.3f}" if h.get("mean_auc") is not None else "mean AUC undefined")
        + (f", worst specificity {worst['value']:.2f} ({worst['shift']} {worst['severity']})"
           if worst else ""), fontsize=9)
    return _save(fig, path)
