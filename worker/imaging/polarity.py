"""Whether a picture is stored inverted: white lungs on a dark mediastinum, as PNG/JPEG
exports of MONOCHROME1 films and "black bone" displays are. A DICOM file says so in its
header (PhotometricInterpretation, PresentationLUTShape); a picture does not, and the
network scored inverted copies of the test split at AUC 0.74.

A logistic regression on the film's 8 x 8 block means, fitted by ``python -m
training.polarity`` on the training split and its inversions; its coefficients and
measured error rates are in ``polarity.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from skimage.transform import resize

from worker.imaging.pixels import block_reduce_mean

WEIGHTS = Path(__file__).with_name("polarity.json")
GRID = 8
INVERTED_PROBABILITY = 0.9  # well clear of the upright films' scores (see polarity.json)


def polarity_features(gray: np.ndarray) -> np.ndarray:
    """The film less its outer tenth, as GRID x GRID block means, standardised."""
    rows, cols = gray.shape
    film = gray[rows // 10 : rows - rows // 10, cols // 10 : cols - cols // 10]
    small = resize(block_reduce_mean(film, 8 * GRID), (GRID, GRID), anti_aliasing=True)
    values = small.ravel().astype(np.float64)
    return (values - values.mean()) / (values.std() + 1e-6)


def inverted_probability(gray: np.ndarray) -> float:
    coefficients, intercept = _weights()
    score = float(polarity_features(gray) @ coefficients + intercept)
    return 1.0 / (1.0 + np.exp(-score))


def looks_inverted(gray: np.ndarray) -> bool:
    return inverted_probability(gray) >= INVERTED_PROBABILITY


@functools.cache
def _weights() -> tuple[np.ndarray, float]:
    fitted = json.loads(WEIGHTS.read_text())
    return np.asarray(fitted["coefficients"], dtype=np.float64), float(fitted["intercept"])
