"""Averaging several trained models into one artifact.

Networks trained from scratch on a few thousand radiographs vary from seed to seed; the
mean of their probabilities is steadier than any one of them. The members become one
Keras model (and one TFLite file), so the worker runs an ensemble like any other model.
The threshold is chosen again, on the validation split, with the members' rule. Members
must share the training images (one training manifest), so the card's training fields
hold for the ensemble; its validation fields are the ensemble's own.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import DEFAULT_MAX_PIXELS
from training.data import Sample, label_counts, list_split, make_dataset
from training.scoring import load_keras
from training.train import (
    export_tflite,
    predict_keras,
    threshold_fields,
    verify_tflite,
    write_card,
)
from worker.errors import UserError
from worker.model import CARD_FILE, KERAS_FILE, TFLITE_FILE


def combine(members: list[Any], size: int) -> Any:
    """One Keras model whose output is the mean of the members' probabilities."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="image")
    for index, member in enumerate(members):
        member.name = f"member_{index}"
    outputs = layers.Average(name="mean_probability")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name="cxr_ensemble")


def check_members(cards: list[dict[str, Any]]) -> None:
    """One input size, one preprocessing version and one training manifest."""
    for key in ("input_size", "preprocessing_version", "training_manifest_sha256"):
        values = {c.get(key) for c in cards}
        if len(values) != 1 or None in values:
            raise UserError(f"ensemble members need one {key}; found {sorted(map(str, values))}")


def check_out(member_dirs: list[Path], out: Path) -> None:
    """Writing into a member's folder would replace the member being averaged."""
    if Path(out).resolve() in {Path(d).resolve() for d in member_dirs}:
        raise UserError(f"--out {out} is one of the members: choose a new folder")


def validation_samples(data_dir: Path) -> list[Sample]:
    """The normal/ and covid/ files of ``DATA_DIR/val``, which must hold both."""
    samples = list_split(data_dir, "val", include=("normal", "covid"))
    if {s.label for s in samples} != {"normal", "covid"}:
        raise UserError(f"{Path(data_dir) / 'val'} needs normal/ and covid/ images")
    return samples


def shared(dicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The entries that every dict holds with the same value."""
    return {k: v for k, v in dicts[0].items() if all(k in d and d[k] == v for d in dicts)}


def build_ensemble(
    member_dirs: list[Path],
    data_dir: Path,
    out: Path,
    *,
    version: str = "1.0.0",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """The combined model, written to ``out`` only once its threshold is chosen: nothing
    is written for data it cannot be chosen on."""
    started = time.perf_counter()
    check_out(member_dirs, out)
    cards = [json.loads((Path(d) / CARD_FILE).read_text()) for d in member_dirs]
    check_members(cards)
    val_samples = validation_samples(data_dir)
    first = cards[0]
    size = int(first["input_size"])
    model = combine([load_keras(Path(d)) for d in member_dirs], size)
    y_val, p_val = predict_keras(model, val_samples, size, 32, max_pixels=max_pixels)
    target = float(first["target_sensitivity"])
    chosen = threshold_fields(y_val, p_val, target)
    probe = np.stack(
        [
            x
            for x, _ in make_dataset(val_samples, size, 8, training=False, max_pixels=max_pixels)
            .unbatch()
            .take(8)
            .as_numpy_iterator()
        ]
    )

    out.mkdir(parents=True, exist_ok=True)
    # An old card beside new weights would be read as theirs if this stopped here.
    (out / CARD_FILE).unlink(missing_ok=True)
    model.save(out / KERAS_FILE)
    export_tflite(model, out / TFLITE_FILE)
    card = {
        **first,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": f"mean of {len(cards)} x {first['architecture']} (seeds "
        + ", ".join(str(c["hyperparameters"]["seed"]) for c in cards)
        + ")",
        "members": [
            {
                "seed": c["hyperparameters"]["seed"],
                "val_auc": c["metrics"]["val"]["auc"],
                "best_epoch": c.get("best_epoch"),
                "epochs_run": c.get("epochs_run"),
                "training_seconds": c["training_seconds"],
                "hyperparameters": c["hyperparameters"],
                "augmentation": c.get("augmentation"),
            }
            for c in cards
        ],
        "hyperparameters": shared([c["hyperparameters"] for c in cards]),
        "augmentation": shared([c.get("augmentation") or {} for c in cards]),
        "validation_counts": label_counts(y_val),
        "parameters": int(model.count_params()),
        "training_seconds": round(sum(c["training_seconds"] for c in cards), 1),
        "ensemble_seconds": round(time.perf_counter() - started, 1),
        "threshold": chosen["threshold"],
        "threshold_rule": chosen["threshold_rule"],
        "tflite_max_abs_diff_vs_keras": verify_tflite(model, out / TFLITE_FILE, probe),
        "metrics": {"val": chosen["val"], "test": None},
    }
    for key in ("fit_seconds", "epochs_run", "best_epoch"):
        card.pop(key, None)
    write_card(out, card)
    return card
