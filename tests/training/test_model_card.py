"""The contract of the SHIPPED model folder (models/cxr-compact)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from worker.imaging.pipeline import PREPROCESSING_VERSION
from worker.model import Classifier, ModelError, read_card

REQUIRED = (
    "name",
    "version",
    "created",
    "architecture",
    "input_size",
    "preprocessing_version",
    "class_names",
    "positive_class",
    "threshold",
    "threshold_rule",
    "training_manifest_sha256",
    "pneumonia_policy",
    "parameters",
    "training_seconds",
    "metrics",
)


def test_card_fields(shipped_model: Path) -> None:
    card = json.loads((shipped_model / "model_card.json").read_text())
    missing = [k for k in REQUIRED if k not in card]
    assert not missing, missing
    assert card["name"] == "cxr-compact"
    assert card["class_names"] == ["normal", "covid"] and card["positive_class"] == "covid"
    assert 0.0 < card["threshold"] < 1.0
    assert card["preprocessing_version"] == PREPROCESSING_VERSION
    assert len(card["training_manifest_sha256"]) == 64
    assert card["training_seconds"] < 30 * 60
    assert {"val", "test"} <= set(card["metrics"])
    for split in ("val", "test"):
        figures = card["metrics"][split]
        assert {"auc", "sensitivity", "specificity", "threshold"} <= set(figures), split
        assert figures["threshold"] == card["threshold"]
    assert read_card(shipped_model).input_size == card["input_size"]


def test_folder_is_small_and_complete(shipped_model: Path) -> None:
    for name in ("model.tflite", "model.keras", "model_card.json"):
        assert (shipped_model / name).is_file(), name
    size = sum(p.stat().st_size for p in shipped_model.rglob("*") if p.is_file())
    assert size < 8.5e6


def test_tflite_has_dynamic_batch(shipped_model: Path) -> None:
    clf = Classifier(shipped_model)
    s = clf.input_size
    rng = np.random.default_rng(0)
    for n in (1, 5, 16):
        p = clf.predict(rng.random((n, s, s, 1), np.float32))
        assert p.shape == (n,) and np.all((p >= 0) & (p <= 1))


def test_manifest_hash_matches_the_training_split(shipped_model: Path, cxr_dir: Path) -> None:
    from training.data import list_split, manifest_sha256

    card = json.loads((shipped_model / "model_card.json").read_text())
    assert (
        manifest_sha256(list_split(cxr_dir, "train"), cxr_dir) == card["training_manifest_sha256"]
    )


def test_shipped_model_separates_a_test_sample(shipped_model: Path, cxr_dir: Path) -> None:
    """AUC >= 0.95 on a seeded sample of the shared test split (tflite, worker pipeline)."""
    from sklearn.metrics import roc_auc_score

    from training.data import list_split
    from training.scoring import score_files

    samples = list_split(cxr_dir, "test")
    rng = np.random.default_rng(0)
    pick = [samples[i] for i in sorted(rng.choice(len(samples), 200, replace=False))]
    clf = Classifier(shipped_model)
    probs, rejected = score_files([s.path for s in pick], clf.predict, clf.input_size)
    assert not rejected
    y = np.array([s.target for s in pick])
    assert roc_auc_score(y, probs) >= 0.95


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("preprocessing_version", "1", "is for preprocessing version 1"),
        ("class_names", ["covid", "normal"], "names classes ['covid', 'normal']"),
        # a hand-edited card: every film would be labelled normal (or covid) in silence
        ("threshold", 1.5, "has threshold 1.5; it must lie between 0 and 1"),
        ("threshold", float("nan"), "has threshold nan"),
        # new weights beside an old card (a training that stopped between the two)
        ("input_size", 96, "takes inputs of shape [160, 160, 1], its card says 96 px"),
        # the results' key is 64 characters: two versions sharing them were one
        ("version", "1.0.0-" + "x" * 60, "is longer than 64 characters"),
    ],
)
def test_a_card_for_other_inputs_or_classes_is_refused(
    field: str, value: object, message: str, model_copy: Path
) -> None:
    """The network would run on such a card and give confident wrong answers."""
    card = json.loads((model_copy / "model_card.json").read_text())
    (model_copy / "model_card.json").write_text(json.dumps({**card, field: value}))
    with pytest.raises(ModelError, match=re.escape(message)):
        Classifier(model_copy)


def test_a_card_that_is_not_json_is_one_clear_error(model_copy: Path) -> None:
    (model_copy / "model_card.json").write_text('{"name": "cxr-compact",')
    with pytest.raises(ModelError, match=r"model_card\.json cannot be read: Expecting"):
        read_card(model_copy)
