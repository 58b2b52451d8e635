"""The PNG figures of training and evaluation (matplotlib, drawn off-screen)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from training import CLASS_NAMES
from training.metrics import ECE_BINS, as_text


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y: np.ndarray, p: np.ndarray, m: dict[str, Any], path: Path, title: str) -> None:

    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve

    plt = pyplot()
    with warnings.catch_warnings():  # one class only: evaluate has said so already
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, _ = roc_curve(y, p)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(
        fpr, tpr, label=f"AUC {m['auc']:.4f} (95% CI {m['auc_ci95'][0]:.4f}-{m['auc_ci95'][1]:.4f})"
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot(
        1 - m["specificity"],
        m["sensitivity"],
        "o",
        color="red",
        label=f"threshold {m['threshold']:.3f}: sens {m['sensitivity']:.3f}, "
        f"spec {m['specificity']:.3f}",
    )
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_robustness(full: dict[str, Any], shifts: dict[str, Any], path: Path) -> None:
    """AUC per acquisition shift as bars, sensitivity / specificity at the threshold as labels."""
    plt = pyplot()
    names = ["full image", *shifts]
    rows = [full, *shifts.values()]
    aucs = np.array([np.nan if r["auc"] is None else r["auc"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.2))
    ax.barh(names, aucs, color=["#4c72b0"] + ["#dd8452"] * len(shifts))
    left = max(0.5, float(np.min(aucs, initial=1.0, where=~np.isnan(aucs))) - 0.05)
    for i, r in enumerate(rows):
        ax.text(
            left + 0.002,
            i,
            f"AUC {as_text(r['auc'], 3)}  sens {as_text(r['sensitivity'], 2)}  "
            f"spec {as_text(r['specificity'], 2)}",
            va="center",
            color="white",
            fontsize=8,
        )
    ax.set_xlim(left, 1.0)
    ax.invert_yaxis()
    ax.set_xlabel("ROC AUC (sensitivity / specificity at the card threshold)")
    ax.set_title("Acquisition-shift robustness")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(m: dict[str, Any], path: Path, title: str) -> None:
    plt = pyplot()
    cm = np.array(m["confusion_matrix"]["matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="white" if v > cm.max() / 2 else "black",
            fontsize=14,
        )
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(m: dict[str, Any], path: Path, title: str) -> None:
    plt = pyplot()
    bins = m["calibration"]["bins"]
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.bar(
        centres,
        [b["observed_covid_rate"] for b in bins],
        width=0.1,
        edgecolor="black",
        alpha=0.7,
        label="observed covid rate",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(
        [b["mean_probability"] for b in bins],
        [b["observed_covid_rate"] for b in bins],
        "o-",
        color="red",
        label="bin mean probability",
    )
    ax.set(
        ylabel="observed covid rate",
        title=f"{title}\nECE ({ECE_BINS} bins) = {m['calibration']['ece']:.4f}",
    )
    ax.legend(fontsize=8)
    ax2.bar(centres, [b["n"] for b in bins], width=0.1, edgecolor="black")
    ax2.set(xlabel="predicted probability of covid", ylabel="images", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: dict[str, list[float]], path: Path, title: str) -> None:
    plt = pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "train"), ("val_loss", "val")):
        if key in history:
            axes[0].plot(epochs, history[key], marker="o", label=label)
    axes[0].set(title="loss (class-weighted BCE on train)", xlabel="epoch", ylabel="loss")
    for key, label in (("auc", "train"), ("val_auc", "val")):
        if key in history:
            axes[1].plot(epochs, history[key], marker="o", label=label)
    axes[1].set(title="ROC AUC", xlabel="epoch", ylabel="AUC")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
