"""The shortcut audit: does the model look at the lungs?

The scoring is repeated with parts of the network input (after ``model_input``: cropped
and equalised) filled with its mean grey. Masking before ``model_input`` would re-run
the histogram equalisation on a picture half of one value and score pictures the
network never saw (the centre-only control fell to AUC 0.71):

* ``border_only``: only the outer band (``AUDIT_BAND`` of each side) is shown. The
  pipeline's crop has already removed the film's outer 10 %, where text markers sit.
* ``lungs_hidden``: a box over each lung field is filled; the mediastinum between them
  stays visible. AUC should fall sharply.
* ``centre_only``: control, the band is filled; AUC should stay near the full image's.

and a Grad-CAM grid of correctly and wrongly classified images (needs model.keras).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Sample, load_input
from training.plots import pyplot
from training.robustness import GrayTransform
from training.scoring import Scorer, load_keras, score_altered
from worker.model import KERAS_FILE

# Of the network input, each side: the film's outer 20 % less the pipeline's 10 % crop.
AUDIT_BAND = 0.125


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
    plt = pyplot()
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
    plt = pyplot()
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
