"""Fit the picture polarity check (``worker/imaging/polarity.py``):
``python -m training.polarity DATA_DIR [--out worker/imaging/polarity.json]``.

Each training picture is an upright example and its inversion an inverted one; val/
and test/ are scored the same way and their error rates stored beside the coefficients.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from training.data import LABELS, list_split
from worker.imaging.pipeline import is_picture, picture_gray, trimmed_film
from worker.imaging.polarity import INVERTED_PROBABILITY, WEIGHTS, polarity_features


def examples(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features of every picture of the split as stored (label 0: a few of them are in
    fact inverted, and stay label noise) and of its inversion (1)."""
    features, labels = [], []
    for sample in list_split(data_dir, split, include=(*LABELS, "pneumonia")):
        if is_picture(sample.path):
            with Image.open(sample.path) as img:
                view = trimmed_film(picture_gray(ImageOps.exif_transpose(img)))
            features += [polarity_features(view), polarity_features(1.0 - view)]
            labels += [0, 1]
    return np.array(features), np.array(labels)


def error_rates(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    flagged = probabilities >= INVERTED_PROBABILITY
    return {
        "upright_flagged": int((flagged & (labels == 0)).sum()),
        "upright": int((labels == 0).sum()),
        "inverted_caught": float(flagged[labels == 1].mean()),
    }


def fit(data_dir: Path) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=2000).fit(*examples(data_dir, "train"))
    measured = {}
    for split in ("val", "test"):
        features, labels = examples(data_dir, split)
        measured[split] = error_rates(model.predict_proba(features)[:, 1], labels)
    return {
        "coefficients": model.coef_.ravel().tolist(),
        "intercept": float(model.intercept_[0]),
        "fitted_on": f"{Path(data_dir).name}/train and its inversions",
        "created": dt.date.today().isoformat(),
        "inverted_probability": INVERTED_PROBABILITY,
        "measured": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    fitted = fit(args.data_dir)
    args.out.write_text(json.dumps(fitted, indent=2) + "\n")
    print(f"wrote {args.out}: {json.dumps(fitted['measured'])}")


if __name__ == "__main__":
    main()
