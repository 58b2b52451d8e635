"""Scoring a list of files with a model folder, for ``evaluate`` and its audits.

``Scorer`` runs the worker's LiteRT ``Classifier`` on ``model_input(load_gray(path), size)``
(the worker's own pixels), or ``model.keras`` where asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import DEFAULT_MAX_PIXELS
from training.data import load_input, load_or_reason
from training.robustness import GrayTransform
from training.train import binary_summary
from worker.imaging.pipeline import load_gray, model_input
from worker.model import KERAS_FILE, Classifier, read_card

BATCH = 16


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
