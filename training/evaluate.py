"""Evaluate a model folder on labelled images: ``DATA_DIR/test/<label>/`` or ``DATA_DIR/<label>/``.

The task is binary, normal vs covid. ``pneumonia/`` images (if any) are NOT part of the
binary figures; they are reported separately (how many the model flags as covid at the
card threshold). Scoring uses the worker's LiteRT ``Classifier`` on
``model_input(load_gray(path), size)``, or ``model.keras`` with ``use_keras``.

``shortcut_audit`` repeats the scoring with parts of the network input (after
``model_input``: cropped and equalised) filled with its mean grey. Masking before
``model_input`` would re-run the histogram equalisation on a picture half of one value
and score pictures the network never saw (the centre-only control fell to AUC 0.71):

* ``border_only``: only the outer band (``AUDIT_BAND`` of each side) is shown. The
  pipeline's crop has already removed the film's outer 10 %, where text markers sit.
* ``lungs_hidden``: a box over each lung field is filled; the mediastinum between them
  stays visible. AUC should fall sharply.
* ``centre_only``: control, the band is filled; AUC should stay near the full image's.

and draws a Grad-CAM grid of correctly and wrongly classified images (needs model.keras).

``robustness`` re-scores under the acquisition shifts of ``training.robustness`` (other
framing, aspect ratio, resolution, compression, noise, positioning, detector processing)
and reports AUC, sensitivity and specificity at the card threshold for each, with a bar
chart.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score, roc_curve

from config.settings import DEFAULT_MAX_PIXELS
from training import CLASS_NAMES
from training.data import (
    Sample,
    child_folder,
    folder_key,
    list_samples,
    load_input,
    load_or_reason,
    manifest_sha256,
    split_dir,
    warn_left_out,
)
from training.predict import COLUMNS, rejected_file, screened_file
from training.robustness import SHIFTS, GrayTransform
from training.train import (
    DEFAULT_TARGET_SENSITIVITY,
    binary_summary,
    subsample,
    threshold_fields,
    to_json,
)
from worker.csv_rows import write_csv_row
from worker.errors import UserError
from worker.imaging.pipeline import load_gray, model_input
from worker.model import CARD_FILE, KERAS_FILE, Classifier, read_card

log = logging.getLogger(__name__)

PREVALENCES = (0.01, 0.05, 0.20)
ECE_BINS = 10
# Of the network input, each side: the film's outer 20 % less the pipeline's 10 % crop.
AUDIT_BAND = 0.125
BATCH = 16
PREDICTION_COLUMNS = ("path", "label", *COLUMNS[1:])  # predict's, with the folder's label
# Everything evaluate writes into its folder.
OUTPUT_FILES = (
    "metrics.json",
    "report.txt",
    "predictions.csv",
    "roc.png",
    "confusion_matrix.png",
    "reliability.png",
    "audit_examples.png",
    "gradcam_grid.png",
    "robustness.png",
)


# ------------------------------------------------------------------ scoring


class Scorer:
    """Probability of covid for (N,S,S,1) inputs, from the TFLite or the Keras model."""

    def __init__(self, model_dir: Path, use_keras: bool = False) -> None:
        self.card = read_card(model_dir)
        self.size = self.card.input_size
        self.threshold = self.card.threshold
        self.keras_model: Any = None
        self._classifier: Classifier | None = None
        if use_keras:
            self.keras_model = load_keras(model_dir)
        else:
            self._classifier = Classifier(model_dir, threads=1)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._classifier is not None:
            return self._classifier.predict(batch)
        return np.asarray(self.keras_model(batch, training=False)).reshape(-1)


def load_keras(model_dir: Path) -> Any:
    import keras

    path = Path(model_dir) / KERAS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {KERAS_FILE} in {model_dir}")
    return keras.models.load_model(path, compile=False)


def score_files(
    paths: Sequence[Path],
    scorer: Callable[[np.ndarray], np.ndarray],
    size: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """Probabilities (NaN for rejected files) and the rejected (path, reason) list."""
    probs = np.full(len(paths), np.nan, dtype=np.float64)
    rejected: list[tuple[Path, str]] = []
    for start in range(0, len(paths), BATCH):
        idx, arrays = [], []
        for i in range(start, min(start + BATCH, len(paths))):
            x, reason = load_or_reason(paths[i], size, max_pixels)
            if x is None:
                rejected.append((paths[i], reason))
            else:
                arrays.append(x)
                idx.append(i)
        if arrays:
            probs[idx] = scorer(np.stack(arrays))
    return probs, rejected


def score_altered(
    table: dict[str, tuple[GrayTransform, str]],
    paths: Sequence[Path],
    y: np.ndarray,
    scorer: Callable[[np.ndarray], np.ndarray],
    size: int,
    threshold: float,
    *,
    max_pixels: int,
    on_input: bool = False,
) -> dict[str, dict[str, Any]]:
    """AUC, and sensitivity / specificity at ``threshold``, with each transform applied to
    the grey image before ``model_input``, or with ``on_input`` to the network input.
    ``paths`` are files the pipeline has read already; each is decoded once for all the
    transforms."""

    def load(path: Path) -> np.ndarray:
        return load_input(path, size, max_pixels) if on_input else load_gray(path, max_pixels)

    def finish(altered: np.ndarray) -> np.ndarray:
        return altered if on_input else model_input(altered, size)

    probs = {key: np.empty(len(paths)) for key in table}
    for start in range(0, len(paths), BATCH):
        loaded = [load(path) for path in paths[start : start + BATCH]]
        for key, (transform, _) in table.items():
            batch = np.stack([finish(transform(image)) for image in loaded])
            probs[key][start : start + len(loaded)] = scorer(batch)
    found: dict[str, dict[str, Any]] = {}
    for key, (_, what) in table.items():
        summary = binary_summary(y, probs[key], threshold)
        found[key] = {k: summary[k] for k in ("auc", "sensitivity", "specificity")}
        found[key]["what"] = what
    return found


def _box(
    shape: tuple[int, ...], top: float, bottom: float, left: float, right: float
) -> tuple[slice, slice]:
    rows, cols = shape[:2]
    return (
        slice(round(rows * top), round(rows * bottom)),
        slice(round(cols * left), round(cols * right)),
    )


def border_only(x: np.ndarray, band: float = AUDIT_BAND) -> np.ndarray:
    """Only the outer band of the network input is shown; the centre is its mean grey."""
    out = x.copy()
    out[_box(x.shape, band, 1 - band, band, 1 - band)] = float(x.mean())
    return out


def centre_only(x: np.ndarray, band: float = AUDIT_BAND) -> np.ndarray:
    """Control: the outer band of the network input is its mean grey, the centre is shown."""
    out = np.full_like(x, float(x.mean()))
    box = _box(x.shape, band, 1 - band, band, 1 - band)
    out[box] = x[box]
    return out


# In the network input (the film less its outer 10 %): top, bottom, left, right. The
# central fifth, where the mediastinum and most of the heart are, stays visible.
LUNG_BOXES = ((0.06, 0.90, 0.03, 0.40), (0.06, 0.90, 0.60, 0.97))


def lungs_hidden(x: np.ndarray) -> np.ndarray:
    """Both lung fields (a box per side of a frontal film) filled with the mean grey;
    mediastinum, diaphragm, shoulders and the band around the boxes stay visible."""
    out = x.copy()
    fill = float(x.mean())
    for box in LUNG_BOXES:
        out[_box(x.shape, *box)] = fill
    return out


AUDITS: dict[str, tuple[GrayTransform, str]] = {
    "border_only": (
        border_only,
        f"outer {AUDIT_BAND:.1%} band of the network input only, the rest its mean grey",
    ),
    "lungs_hidden": (
        lungs_hidden,
        "both lung-field boxes of the network input at its mean grey (should fall sharply)",
    ),
    "centre_only": (
        centre_only,
        f"control: outer {AUDIT_BAND:.1%} band of the network input at its mean grey "
        "(should stay near the full image)",
    ),
}


# ------------------------------------------------------------------ figures


def bootstrap_auc(
    y: np.ndarray,
    p: np.ndarray,
    n: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile 95% interval of the ROC AUC over ``n`` seeded case resamples."""
    lo, hi = np.percentile(bootstrap_aucs(y, p, n, seed), [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_aucs(y: np.ndarray, p: np.ndarray, n: int, seed: int) -> list[float]:
    """The ROC AUCs of ``n`` seeded case resamples. A resample of one class has none and
    is drawn again: skipped instead, a site folder of 1 covid and 20 normal films had its
    interval from 1,288 resamples where the report said 2,000."""

    rng = np.random.default_rng(seed)
    aucs: list[float] = []
    while len(aucs) < n:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            aucs.append(float(roc_auc_score(y[idx], p[idx])))
    return aucs


def predictive_values(sens: float, spec: float, prevalence: float) -> dict[str, float]:
    tp, fp = sens * prevalence, (1 - spec) * (1 - prevalence)
    tn, fn = spec * (1 - prevalence), (1 - sens) * prevalence
    return {
        "prevalence": prevalence,
        "ppv": float(tp / (tp + fp)) if tp + fp else float("nan"),
        "npv": float(tn / (tn + fn)) if tn + fn else float("nan"),
    }


def calibration(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error of P(covid) with equal-width bins, plus the bin table."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        k = int(mask.sum())
        if k:
            conf, freq = float(p[mask].mean()), float(y[mask].mean())
            ece += k / len(y) * abs(conf - freq)
        else:
            conf, freq = float("nan"), float("nan")
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": k,
                "mean_probability": conf,
                "observed_covid_rate": freq,
            }
        )
    return {"ece": float(ece), "bins": table}


def binary_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, n_bootstrap: int, seed: int
) -> dict[str, Any]:

    pred = (p >= threshold).astype(int)
    cm = confusion_matrix(y, pred, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    both = y.min() != y.max()
    auc = float(roc_auc_score(y, p)) if both else float("nan")
    lo, hi = bootstrap_auc(y, p, n_bootstrap, seed) if both else (float("nan"),) * 2
    report_text = classification_report(
        y, pred, labels=[0, 1], target_names=list(CLASS_NAMES), digits=4, zero_division=0
    )
    return {
        "n": len(y),
        "n_covid": int(y.sum()),
        "n_normal": int(len(y) - y.sum()),
        "auc": auc,
        "auc_ci95": [lo, hi],
        "bootstrap_resamples": n_bootstrap,
        "bootstrap_seed": seed,
        "threshold": threshold,
        "sensitivity": sens,
        "specificity": spec,
        "accuracy": (tp + tn) / len(y),
        "confusion_matrix": {
            "labels": list(CLASS_NAMES),
            "matrix": cm.tolist(),
            "tn": tn,
            "fp": fp,
            "fn": fn,
            "tp": tp,
        },
        "predictive_values": [predictive_values(sens, spec, q) for q in PREVALENCES],
        "calibration": calibration(y, p),
        "classification_report": classification_report(
            y,
            pred,
            labels=[0, 1],
            target_names=list(CLASS_NAMES),
            output_dict=True,
            zero_division=0,
        ),
        "classification_report_text": report_text,
    }


# ------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(y: np.ndarray, p: np.ndarray, m: dict[str, Any], path: Path, title: str) -> None:

    plt = _plt()
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
    plt = _plt()
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
            f"AUC {_num(r['auc'], 3)}  sens {_num(r['sensitivity'], 2)}  "
            f"spec {_num(r['specificity'], 2)}",
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
    plt = _plt()
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
    plt = _plt()
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


# ------------------------------------------------------------------ Grad-CAM


def grad_cam(model: Any, inputs: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Grad-CAM maps (N,S,S) in [0,1] for the logit of covid (sign +1) or normal (-1).

    For an ensemble (whole classifiers nested as members) the members' maps are averaged.
    """
    import keras
    import tensorflow as tf

    from training.models import feature_map, is_classifier

    size = inputs.shape[1]
    members = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and is_classifier(layer, size)
    ]
    if members:
        cams = np.mean([grad_cam(member, inputs, signs) for member in members], axis=0)
        peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
        return np.asarray(cams / np.maximum(peak, 1e-8))

    head = model.layers[-1]
    features = keras.Model(model.inputs, [feature_map(model), head.input])
    x = tf.convert_to_tensor(inputs, tf.float32)
    with tf.GradientTape() as tape:
        conv, pooled = features(x, training=False)
        logit = tf.matmul(pooled, head.kernel)[:, 0] + head.bias[0]
        score = tf.reduce_sum(logit * tf.constant(signs, tf.float32))
    grads = tape.gradient(score, conv)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
    cam = tf.image.resize(cam[..., None], (size, size))[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return cam / np.maximum(peak, 1e-8)


def gradcam_grid(
    model: Any,
    samples: Sequence[Sample],
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    size: int,
    path: Path,
    *,
    max_pixels: int,
    per_row: int = 6,
    seed: int = 0,
) -> dict[str, int]:
    """Rows: true positives, true negatives, false positives, false negatives."""
    plt = _plt()
    pred = p >= threshold
    groups = {
        "true positive (covid)": np.flatnonzero((y == 1) & pred),
        "true negative (normal)": np.flatnonzero((y == 0) & ~pred),
        "false positive": np.flatnonzero((y == 0) & pred),
        "false negative": np.flatnonzero((y == 1) & ~pred),
    }
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(groups), per_row, figsize=(2.1 * per_row, 2.4 * len(groups)))
    shown = {}
    for row, (name, idx) in enumerate(groups.items()):
        chosen: np.ndarray = (
            rng.choice(idx, min(per_row, len(idx)), replace=False) if len(idx) else idx[:0]
        )
        shown[name] = len(idx)
        inputs = (
            np.stack([load_input(samples[i].path, size, max_pixels) for i in chosen])
            if len(chosen)
            else np.zeros((0, size, size, 1), np.float32)
        )
        cams: np.ndarray = (
            grad_cam(model, inputs, np.where(pred[chosen], 1.0, -1.0))
            if len(chosen)
            else np.zeros((0, size, size))
        )
        for col in range(per_row):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(chosen):
                i = chosen[col]
                ax.imshow(inputs[col, ..., 0], cmap="gray", vmin=0, vmax=1)
                ax.imshow(cams[col], cmap="jet", alpha=0.35, vmin=0, vmax=1)
                ax.set_title(f"p={p[i]:.2f}", fontsize=8)
        axes[row, 0].text(
            -0.08,
            0.5,
            f"{name}\n(n={len(idx)})",
            rotation=90,
            ha="right",
            va="center",
            transform=axes[row, 0].transAxes,
            fontsize=9,
        )
    fig.suptitle("Grad-CAM of the predicted class on the model input (test split)")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return shown


# ------------------------------------------------------------------ main


def evaluate(
    data_dir: Path,
    model_dir: Path,
    out: Path,
    *,
    split: str = "test",
    shortcut_audit: bool = False,
    robustness: bool = False,
    use_keras: bool = False,
    write_card: bool = False,
    rethreshold: bool = False,
    threshold: float | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """With ``rethreshold`` (``DATA_DIR/val/`` only) the card's threshold is chosen again on
    this split's scores with the current rule and stored, with metrics.val, in the card.
    ``threshold`` replaces the card's (a site's ``CXR_THRESHOLD``) in the figures.
    Files over ``max_pixels`` (the worker's ``CXR_MAX_PIXELS``) are rejected as there."""
    model_dir, out = Path(model_dir), Path(out)
    check_options(Path(data_dir), split, model_dir, write_card, rethreshold, threshold)
    folder = split_dir(data_dir, split)
    out.mkdir(parents=True, exist_ok=True)
    warn_left_out(folder)
    samples = list_samples(folder, ("normal", "covid"))
    if not samples:
        raise FileNotFoundError(f"no normal/ or covid/ images under {folder}")
    pneumonia = list_samples(folder, ("pneumonia",))
    scorer = Scorer(model_dir, use_keras=use_keras)
    scored_with = "keras" if use_keras else "tflite"
    threshold = scorer.threshold if threshold is None else threshold

    probs, rejected = score_files([s.path for s in samples], scorer, scorer.size, max_pixels)
    ok = scored(samples, probs, rejected, folder)
    y, p = np.array([s.target for s in samples])[ok], probs[ok]
    good = [s for s, k in zip(samples, ok, strict=True) if k]
    card_change = None
    if rethreshold:
        card_change = store_threshold(model_dir, y, p, scored_with)
        threshold = card_change["threshold"]
    m = binary_metrics(y, p, threshold, n_bootstrap, seed)
    metrics: dict[str, Any] = {
        "model": scorer.card.model_version,
        "model_dir": str(model_dir),
        "scored_with": scored_with,
        "data": str(folder),
        "task": "binary normal vs covid; pneumonia reported separately",
        **m,
        "rejected": rejected_rows(rejected),
    }
    if card_change is not None:
        metrics["card_threshold"] = card_change
    pneumonia_probs, pneumonia_rejected = score_files(
        [s.path for s in pneumonia], scorer, scorer.size, max_pixels
    )
    if pneumonia:
        metrics["pneumonia"] = pneumonia_summary(pneumonia_probs, pneumonia_rejected, threshold)

    for output in OUTPUT_FILES:  # an earlier run's audit or shifts must not pass for this one's
        (out / output).unlink(missing_ok=True)
    name = f"{scorer.card.model_version} ({scored_with})"
    plot_roc(y, p, m, out / "roc.png", f"ROC - {name}")
    plot_confusion(m, out / "confusion_matrix.png", f"{split} @ {threshold:.3f}")
    plot_reliability(m, out / "reliability.png", f"Reliability - {name}")
    write_predictions(
        [*samples, *pneumonia],
        np.concatenate([probs, pneumonia_probs]),
        dict(rejected + pneumonia_rejected),
        threshold,
        out / "predictions.csv",
    )
    if shortcut_audit:
        metrics["shortcut_audit"] = run_shortcut_audit(
            scorer, model_dir, good, y, p, m["auc"], threshold, out, max_pixels, seed
        )
    if robustness:
        shifts = score_altered(
            SHIFTS, [s.path for s in good], y, scorer, scorer.size, threshold, max_pixels=max_pixels
        )
        metrics["robustness"] = {"shifts": shifts, "png": "robustness.png"}
        plot_robustness(m, shifts, out / "robustness.png")

    metrics["text"] = summary_text(metrics)
    (out / "metrics.json").write_text(to_json(metrics))
    (out / "report.txt").write_text(metrics["text"] + "\n")
    if write_card:
        _store_in_card(model_dir, split, metrics)
    return metrics


def check_options(
    data_dir: Path,
    split: str,
    model_dir: Path,
    write_card: bool,
    rethreshold: bool,
    threshold: float | None,
) -> None:
    """Refuse, before anything is scored or written, what would store wrong figures."""
    if rethreshold:
        check_rethreshold(data_dir, split, write_card)
    if threshold is not None and (rethreshold or write_card):
        raise UserError(
            "the card keeps figures at its own threshold: drop --threshold (or CXR_THRESHOLD) "
            "with --write-card or --rethreshold"
        )
    if write_card:
        check_training_data(data_dir, split, model_dir)


def scored(
    samples: Sequence[Sample],
    probs: np.ndarray,
    rejected: list[tuple[Path, str]],
    folder: Path,
) -> np.ndarray:
    """Which samples have a score; none is an error, one class only a warning."""
    ok = ~np.isnan(probs)
    if not ok.any():
        # Reasons, not paths: the folders below the one given can name patients.
        reasons = Counter(reason for _, reason in rejected).most_common(3)
        raise UserError(
            f"none of the {len(samples)} normal/covid images under {folder} could be scored "
            f"({'; '.join(f'{n} x {reason}' for reason, n in reasons)})"
        )
    targets = {s.target for s, k in zip(samples, ok, strict=True) if k}
    if len(targets) < 2:
        (target,) = targets
        log.warning(
            "only %s images could be scored under %s: AUC, %s and the predictive values "
            "need both normal and covid images (n/a below)",
            CLASS_NAMES[target],
            folder,
            "specificity" if target else "sensitivity",
        )
    return ok


def rejected_rows(rejected: list[tuple[Path, str]]) -> list[dict[str, str]]:
    return [{"path": str(path), "reason": reason} for path, reason in rejected]


def pneumonia_summary(
    probs: np.ndarray, rejected: list[tuple[Path, str]], threshold: float
) -> dict[str, Any]:
    """Pneumonia films are outside the binary task: how many the threshold flags."""
    scored_probs = probs[~np.isnan(probs)]
    return {
        "n": len(scored_probs),
        "flagged_covid": int((scored_probs >= threshold).sum()),
        "mean_probability": float(scored_probs.mean()) if len(scored_probs) else None,
        "rejected": rejected_rows(rejected),
    }


def run_shortcut_audit(
    scorer: Scorer,
    model_dir: Path,
    good: Sequence[Sample],
    y: np.ndarray,
    p: np.ndarray,
    full_auc: float | None,
    threshold: float,
    out: Path,
    max_pixels: int,
    seed: int,
) -> dict[str, Any]:
    """AUC with parts of the network input hidden, their pictures, and Grad-CAM where a
    Keras model is at hand."""
    audit: dict[str, Any] = {"full_image_auc": full_auc}
    audit.update(
        score_altered(
            AUDITS,
            [s.path for s in good],
            y,
            scorer,
            scorer.size,
            threshold,
            max_pixels=max_pixels,
            on_input=True,
        )
    )
    audit["examples_png"] = "audit_examples.png"
    plot_audit_examples(good, scorer.size, out / "audit_examples.png", max_pixels)
    model_k = scorer.keras_model
    if model_k is None and (model_dir / KERAS_FILE).is_file():
        model_k = load_keras(model_dir)
    if model_k is None:
        audit["gradcam_png"] = None
        return audit
    audit["gradcam_groups"] = gradcam_grid(
        model_k,
        good,
        y,
        p,
        threshold,
        scorer.size,
        out / "gradcam_grid.png",
        max_pixels=max_pixels,
        seed=seed,
    )
    audit["gradcam_png"] = "gradcam_grid.png"
    return audit


def plot_audit_examples(samples: Sequence[Sample], size: int, path: Path, max_pixels: int) -> None:
    """What the network sees under each audit, for one covid and one normal image."""
    plt = _plt()
    picks = [
        next(s for s in samples if s.label == lab)
        for lab in ("covid", "normal")
        if any(s.label == lab for s in samples)
    ]
    views: list[tuple[str, GrayTransform | None]] = [("full", None)] + [
        (k, f) for k, (f, _) in AUDITS.items()
    ]
    fig, axes = plt.subplots(
        len(picks), len(views), figsize=(2.4 * len(views), 2.6 * len(picks)), squeeze=False
    )
    for r, s in enumerate(picks):
        x = load_input(s.path, size, max_pixels)
        for c, (title, f) in enumerate(views):
            axes[r, c].imshow((f(x) if f else x)[..., 0], cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_title(f"{s.label}: {title}", fontsize=9)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _store_in_card(model_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    card_path = Path(model_dir) / CARD_FILE
    card = json.loads(card_path.read_text())
    keep = (
        "n",
        "n_covid",
        "n_normal",
        "auc",
        "auc_ci95",
        "threshold",
        "sensitivity",
        "specificity",
        "accuracy",
        "confusion_matrix",
        "predictive_values",
        "pneumonia",
        "scored_with",
        "data",
    )
    entry = {k: metrics[k] for k in keep if k in metrics}
    entry["ece"] = metrics["calibration"]["ece"]
    if "shortcut_audit" in metrics:
        entry["shortcut_audit_auc"] = {
            k: v["auc"]
            for k, v in metrics["shortcut_audit"].items()
            if isinstance(v, dict) and "auc" in v
        }
    if "robustness" in metrics:
        entry["robustness_auc"] = {k: v["auc"] for k, v in metrics["robustness"]["shifts"].items()}
    card.setdefault("metrics", {})[split] = entry
    card_path.write_text(to_json(card))


def check_training_data(data_dir: Path, split: str, model_dir: Path) -> None:
    """--write-card files the figures as the model's own: only for a split of the data set
    it was trained on (DATA_DIR/train/ matching the card's training manifest), never for
    a folder of one's own films, which overwrote the shipped test figures."""
    card = json.loads((model_dir / CARD_FILE).read_text())
    train = child_folder(data_dir, "train")
    used = card.get("hyperparameters", {})  # a --max-train model hashed its subset
    trained_on = train is not None and card.get("training_manifest_sha256") == manifest_sha256(
        subsample(list_samples(train), used.get("max_train"), used.get("seed", 0)), data_dir
    )
    if child_folder(data_dir, split) is None or not trained_on:
        raise UserError(
            f"--write-card stores figures in the model card, for a split of the data the "
            f"model was trained on: {data_dir} has no {split}/ beside a train/ that matches "
            "the card's training manifest (evaluate your own folder without --write-card)"
        )


def check_rethreshold(data_dir: Path, split: str, write_card: bool) -> None:
    """--rethreshold needs a real ``DATA_DIR/val/``: ``split_dir`` falls back to DATA_DIR
    itself, so ``DATA/test --split val`` would choose the threshold on the test images."""
    if folder_key(split) != "val":
        raise UserError("the threshold is chosen on the validation split: use --split val")
    if write_card:
        raise UserError("--rethreshold stores metrics.val in the card itself: drop --write-card")
    if child_folder(data_dir, "val") is None:
        raise UserError(
            f"--rethreshold chooses the threshold on DATA_DIR/val/ and {data_dir} has no val/ "
            "folder: pass the folder that holds val/"
        )


def store_threshold(
    model_dir: Path, y: np.ndarray, p: np.ndarray, scored_with: str
) -> dict[str, Any]:
    """Choose the threshold on validation scores (y, p) with the current rule and store it,
    the rule and metrics.val in the model card. Stored figures of other splits at another
    threshold (metrics.test) no longer describe the card and are cleared. Returns the
    previous and the new threshold and the cleared splits."""
    card_path = Path(model_dir) / CARD_FILE
    card = json.loads(card_path.read_text())
    target = float(card.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    chosen = threshold_fields(y, p, target)
    change = {
        "previous": card["threshold"],
        "threshold": float(chosen["threshold"]),
        "cleared": stale_metrics(card.get("metrics", {}), chosen["threshold"]),
    }
    card["threshold"], card["threshold_rule"] = chosen["threshold"], chosen["threshold_rule"]
    metrics = card.setdefault("metrics", {})
    metrics["val"] = {**chosen["val"], "scored_with": scored_with}
    metrics.update(dict.fromkeys(change["cleared"]))
    card_path.write_text(to_json(card))
    return change


def stale_metrics(metrics: dict[str, Any], threshold: float) -> list[str]:
    """The stored splits other than val whose figures are not at ``threshold``."""
    return sorted(
        split
        for split, figures in metrics.items()
        if split != "val" and figures is not None and figures.get("threshold") != threshold
    )


def write_predictions(
    samples: Sequence[Sample],
    probs: np.ndarray,
    reasons: Mapping[Path, str],
    threshold: float,
    path: Path,
) -> None:
    """One row per listed file, pneumonia included: the columns of ``predict`` after
    the folder's label."""
    # backslashreplace: a file name that is not UTF-8 still gives a valid UTF-8 CSV
    with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as stream:
        write_csv_row(stream, PREDICTION_COLUMNS)
        for sample, q in zip(samples, probs, strict=True):
            if sample.path in reasons:
                prediction = rejected_file(sample.path, reasons[sample.path])
            else:
                prediction = screened_file(sample.path, float(q), threshold)
            write_csv_row(stream, (sample.path, sample.label, *prediction.row()[1:]))


def _num(value: float | None, digits: int = 4) -> str:
    """A figure for the report; "n/a" when undefined (None or NaN)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def card_change_text(change: dict[str, Any]) -> list[str]:
    lines = [
        f"card threshold {change['previous']:.4f} -> {change['threshold']:.4f}, chosen on "
        "this split and stored with metrics.val"
    ]
    for split in change["cleared"]:
        lines.append(
            f"removed metrics.{split} from the card: its figures were at another threshold "
            f"(evaluate {split}/ with --write-card again)"
        )
    return lines


def summary_text(m: dict[str, Any]) -> str:
    lines = [
        f"model {m['model']} scored with {m['scored_with']} on {m['data']}",
        f"binary normal vs covid: {m['n']} images ({m['n_normal']} normal, {m['n_covid']} covid)"
        f", {len(m['rejected'])} rejected",
        "",
        m["classification_report_text"],
        f"confusion matrix [rows true normal, covid; cols predicted]: "
        f"{m['confusion_matrix']['matrix']}",
        f"ROC AUC {_num(m['auc'])} (95% bootstrap CI {_num(m['auc_ci95'][0])}-"
        f"{_num(m['auc_ci95'][1])}, {m['bootstrap_resamples']} resamples)",
        f"at threshold {m['threshold']:.4f}: sensitivity {_num(m['sensitivity'])}, "
        f"specificity {_num(m['specificity'])}",
    ]
    for pv in m["predictive_values"]:
        lines.append(
            f"  prevalence {pv['prevalence']:.0%}: PPV {_num(pv['ppv'])}, NPV {_num(pv['npv'])}"
        )
    lines.append(f"expected calibration error ({ECE_BINS} bins): {m['calibration']['ece']:.4f}")
    if "pneumonia" in m:
        pn = m["pneumonia"]
        lines.append(
            f"pneumonia (not in the binary figures): {pn['flagged_covid']} of {pn['n']} "
            f"flagged covid, {len(pn['rejected'])} rejected"
        )
    if "shortcut_audit" in m:
        a = m["shortcut_audit"]
        lines.append(
            "shortcut audit (AUC): "
            + ", ".join(
                f"{k} {_num(v['auc'])}" for k, v in a.items() if isinstance(v, dict) and "auc" in v
            )
        )
    if "robustness" in m:
        lines.append(
            "acquisition shifts (AUC / sens / spec): "
            + ", ".join(
                f"{k} {_num(v['auc'])} / {_num(v['sensitivity'], 3)} / {_num(v['specificity'], 3)}"
                for k, v in m["robustness"]["shifts"].items()
            )
        )
    if "card_threshold" in m:
        lines += card_change_text(m["card_threshold"])
    return "\n".join(lines)
