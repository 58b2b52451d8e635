"""Averaging models into one artifact: same pixels in, the mean probability out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.train import threshold_rule
from worker.errors import UserError
from worker.imaging.pipeline import load_gray, model_input
from worker.model import Classifier


def small_data_dir(
    cxr_dir: Path, root: Path, per_label: int = 20, labels: tuple[str, ...] = ("normal", "covid")
) -> Path:
    for label in labels:
        (root / "val" / label).mkdir(parents=True)
        for png in sorted((cxr_dir / "val" / label).glob("*.png"))[:per_label]:
            (root / "val" / label / png.name).symlink_to(png)
    return root


def test_ensemble_of_one_model_twice_predicts_like_the_model(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    from training.audit import grad_cam
    from training.ensemble import build_ensemble
    from training.scoring import load_keras

    member = json.loads((shipped_model / "model_card.json").read_text())
    data = small_data_dir(cxr_dir, tmp_path / "data")
    out = tmp_path / "ensemble"
    card = build_ensemble([shipped_model, shipped_model], data, out)

    size = card["input_size"]
    images = sorted((cxr_dir / "test" / "covid").glob("*.png"))[:4]
    batch = np.stack([model_input(load_gray(p), size) for p in images])
    single = Classifier(shipped_model).predict(batch)
    averaged = Classifier(out).predict(batch)
    np.testing.assert_allclose(averaged, single, atol=1e-5)

    assert card["parameters"] == 2 * member["parameters"]
    assert len(card["members"]) == 2 and card["metrics"]["test"] is None
    assert card["metrics"]["val"]["sensitivity"] >= card["target_sensitivity"]
    # the validation fields describe the split the threshold was chosen on
    assert (
        card["validation_counts"]
        == {"covid": 20, "normal": 20}
        == {k: card["metrics"]["val"][f"n_{k}"] for k in ("covid", "normal")}
    )
    assert card["threshold_rule"] == threshold_rule(card["target_sensitivity"])
    assert card["hyperparameters"] == member["hyperparameters"]
    cams = grad_cam(load_keras(out), batch, np.ones(len(batch)))
    assert cams.shape == (len(batch), size, size) and float(cams.max()) <= 1.0 + 1e-6


def test_the_ensemble_gives_the_mean_of_different_members() -> None:
    """Two copies of one model agree with any way of combining them; two networks with
    other weights tell the mean from the largest or the first."""
    import keras

    from training.ensemble import combine
    from training.models import build_model

    size = 32
    members = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        members.append(build_model("compact", size))
    batch = np.random.default_rng(0).random((4, size, size, 1)).astype(np.float32)
    alone = [np.asarray(m(batch, training=False)).reshape(-1) for m in members]

    together = np.asarray(combine(members, size)(batch, training=False)).reshape(-1)

    assert np.abs(alone[0] - alone[1]).min() > 1e-4
    np.testing.assert_allclose(together, (alone[0] + alone[1]) / 2, atol=1e-6)


def test_members_trained_on_other_images_are_refused(shipped_model: Path, tmp_path: Path) -> None:
    from training.ensemble import build_ensemble

    other = tmp_path / "other"
    other.mkdir()
    card = json.loads((shipped_model / "model_card.json").read_text())
    card["training_manifest_sha256"] = "0" * 64
    (other / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(UserError, match="training_manifest_sha256"):
        build_ensemble([shipped_model, other], tmp_path, tmp_path / "out")


def test_the_data_is_checked_before_anything_is_written(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """The members were combined and written to --out first: a half-made model folder."""
    from training.ensemble import build_ensemble

    no_val = tmp_path / "no-val"
    (no_val / "train").mkdir(parents=True)
    normal_only = small_data_dir(cxr_dir, tmp_path / "normal-only", 4, ("normal",))
    unreadable_covid = small_data_dir(cxr_dir, tmp_path / "unreadable", 4, ("normal",))
    (unreadable_covid / "val" / "covid").mkdir()
    (unreadable_covid / "val" / "covid" / "cut.png").write_bytes(b"\x89PNG cut")
    cases = [
        (no_val, FileNotFoundError, "no val/ folder"),
        (normal_only, UserError, "needs normal/ and covid/ images"),
        (unreadable_covid, UserError, "no readable covid image"),
    ]
    for data, error, message in cases:
        out = tmp_path / f"out-{data.name}"
        with pytest.raises(error, match=message):
            build_ensemble([shipped_model, shipped_model], data, out)
        assert not out.exists(), data.name


def test_an_out_folder_that_is_a_member_is_refused(
    shipped_model: Path, model_copy: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """The member was overwritten by the ensemble it was part of."""
    from training.ensemble import build_ensemble

    before = {p.name: p.read_bytes() for p in model_copy.iterdir()}
    data = small_data_dir(cxr_dir, tmp_path / "data", 4)
    with pytest.raises(UserError, match="is one of the members"):
        build_ensemble([shipped_model, model_copy], data, tmp_path / "." / "model")
    assert {p.name: p.read_bytes() for p in model_copy.iterdir()} == before


def test_a_stopped_export_leaves_no_old_card_beside_new_weights(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old card would be read as the new weights' (its threshold, its input size)."""
    import training.ensemble
    from training.ensemble import build_ensemble

    def stop(model: object, path: Path) -> bytes:
        raise RuntimeError("stopped")

    out = tmp_path / "out"
    out.mkdir()
    (out / "model_card.json").write_text('{"input_size": 96}')
    monkeypatch.setattr(training.ensemble, "export_tflite", stop)
    data = small_data_dir(cxr_dir, tmp_path / "data", 4)
    with pytest.raises(RuntimeError, match="stopped"):
        build_ensemble([shipped_model, shipped_model], data, out)
    assert (out / "model.keras").is_file() and not (out / "model_card.json").exists()
