from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import Sample, list_samples, manifest_sha256
from training.evaluate import (
    PREDICTION_COLUMNS,
    check_training_data,
    evaluate,
    store_threshold,
    write_predictions,
)
from training.robustness import SHIFTS
from training.train import subsample, threshold_for_sensitivity, threshold_rule
from worker.errors import UserError


def test_evaluate_audits_the_shipped_model_and_records_them_in_a_card_copy(
    model_copy: Path, test_sample: Callable[[int], Path], cxr_dir: Path, tmp_path: Path
) -> None:
    """Shortcut audit and acquisition shifts on a seeded test sample, written to a copy of
    the shipped card: hiding the lungs must cost far more than any acquisition shift."""
    data = tmp_path / "data"  # the sample as test/ beside the training images
    data.mkdir()
    test_sample(30).rename(data / "test")
    (data / "train").symlink_to(cxr_dir / "train")
    m = evaluate(
        data,
        model_copy,
        tmp_path / "eval",
        shortcut_audit=True,
        robustness=True,
        write_card=True,
        n_bootstrap=200,
    )
    shifts = m["robustness"]["shifts"]
    assert set(shifts) == set(SHIFTS)
    for v in shifts.values():
        assert 0 <= v["sensitivity"] <= 1 and 0 <= v["specificity"] <= 1
    assert m["auc"] > 0.95
    assert m["shortcut_audit"]["lungs_hidden"]["auc"] < min(v["auc"] for v in shifts.values())
    for png in ("robustness.png", "audit_examples.png", "gradcam_grid.png"):
        assert (tmp_path / "eval" / png).is_file(), png
    card = json.loads((model_copy / "model_card.json").read_text())
    assert set(card["metrics"]["test"]["robustness_auc"]) == set(SHIFTS)
    assert "acquisition shifts" in m["text"]


def test_write_card_is_refused_for_data_the_model_was_not_trained_on(
    model_copy: Path, test_sample: Callable[[int], Path], tmp_path: Path
) -> None:
    """A site's own folder evaluated with the README's command replaced the shipped test
    figures in the card, and left the earlier run's audit PNGs beside the new figures."""
    card = (model_copy / "model_card.json").read_text()
    out = tmp_path / "eval"
    out.mkdir()
    (out / "gradcam_grid.png").write_bytes(b"an earlier run's")
    own = test_sample(3)
    with pytest.raises(UserError, match="--write-card stores figures in the model card"):
        evaluate(own, model_copy, out, write_card=True, n_bootstrap=100)
    assert (model_copy / "model_card.json").read_text() == card
    for label in ("normal", "covid"):
        (tmp_path / "empty" / label).mkdir(parents=True)
    with pytest.raises(FileNotFoundError):  # a run that fails leaves the last run's files
        evaluate(tmp_path / "empty", model_copy, out, n_bootstrap=100)
    assert (out / "gradcam_grid.png").exists()
    evaluate(own, model_copy, out, n_bootstrap=100)
    assert not (out / "gradcam_grid.png").exists()
    assert (model_copy / "model_card.json").read_text() == card


def test_write_card_accepts_the_data_a_max_train_model_was_trained_on(
    model_copy: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """The card hashes the subset `--max-train` drew, which the check compared with the
    whole train/: such a model's own data set was refused."""
    data = tmp_path / "data"
    _sample_folder(data / "train", cxr_dir, "train", {"normal": 6, "covid": 6})
    _sample_folder(data / "test", cxr_dir, "test", {"normal": 2, "covid": 2})
    card_file = model_copy / "model_card.json"
    card = json.loads(card_file.read_text())
    drawn = subsample(list_samples(data / "train"), 5, 3)
    card["training_manifest_sha256"] = manifest_sha256(drawn, data)
    card["hyperparameters"] = {**card["hyperparameters"], "max_train": 5, "seed": 3}
    card_file.write_text(json.dumps(card))
    check_training_data(data, "test", model_copy)
    card["hyperparameters"]["seed"] = 4  # another subset
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match="matches the card's training manifest"):
        check_training_data(data, "test", model_copy)


def _sample_folder(root: Path, cxr_dir: Path, split: str, per_label: dict[str, int]) -> Path:
    for label, n in per_label.items():
        (root / label).mkdir(parents=True)
        for png in sorted((cxr_dir / split / label).glob("*.png"))[:n]:
            (root / label / png.name).symlink_to(png)
    return root


def test_unreadable_files_and_odd_names_are_reported_not_fatal(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    data = _sample_folder(tmp_path / "data", cxr_dir, "test", {"normal": 3, "covid": 3})
    (data / "covid" / "000_corrupt.png").write_bytes(b"not a png")  # sorted first
    odd = data / "covid" / os.fsdecode(b'a,b "c"\xff.png')
    odd.symlink_to(sorted((cxr_dir / "test" / "covid").glob("*.png"))[-1])
    m = evaluate(data, shipped_model, tmp_path / "eval", shortcut_audit=True, n_bootstrap=100)
    assert m["n"] == 7 and [Path(r["path"]).name for r in m["rejected"]] == ["000_corrupt.png"]
    assert (tmp_path / "eval" / "audit_examples.png").is_file()
    text = (tmp_path / "eval" / "predictions.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 8 and all(list(r) == list(PREDICTION_COLUMNS) for r in rows)
    assert 'a,b "c"\\udcff.png' in {Path(r["path"]).name for r in rows}
    corrupt = next(r for r in rows if r["path"].endswith("000_corrupt.png"))
    assert corrupt["status"] == "rejected" and corrupt["reason"].startswith("unreadable")
    assert corrupt["covid_probability"] == "" and corrupt["predicted_label"] == ""


def test_predictions_csv_gives_one_row_per_file_whatever_its_name(
    csv_awkward_names: tuple[str, ...], tmp_path: Path
) -> None:
    samples = [Sample(tmp_path / "covid" / name, "covid") for name in csv_awkward_names]
    probs = np.linspace(0.1, 0.9, len(samples))
    write_predictions(samples, probs, {}, 0.5, tmp_path / "predictions.csv")
    with (tmp_path / "predictions.csv").open(newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    assert rows[0] == list(PREDICTION_COLUMNS)
    assert rows[1:] == [
        [str(s.path), "covid", f"{q:.6f}", "covid" if q >= 0.5 else "normal", "screened", ""]
        for s, q in zip(samples, probs, strict=True)
    ]


def test_a_split_with_one_class_gives_a_report(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With a warning: exit 0 and "AUC n/a" were easy to miss under a class folder whose
    name was not understood."""
    data = _sample_folder(tmp_path / "data", cxr_dir, "test", {"covid": 4})
    caplog.set_level("WARNING", logger="training.evaluate")
    m = evaluate(
        data,
        shipped_model,
        tmp_path / "eval",
        shortcut_audit=True,
        robustness=True,
        n_bootstrap=100,
    )
    assert "ROC AUC n/a" in m["text"] and "border_only n/a" in m["text"]
    saved = json.loads(
        (tmp_path / "eval" / "metrics.json").read_text(), parse_constant=pytest.fail
    )  # JSON has no NaN: undefined figures are null
    assert saved["auc"] is None and saved["specificity"] is None
    assert "only covid images could be scored under" in caplog.text


def test_label_folders_as_other_data_sets_name_them_are_read(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``COVID/`` + ``Normal/`` (the Kaggle database's own layout) was refused, and
    ``covid-19/`` + ``normal/`` reported 0 covid images, exit 0, AUC n/a."""
    data = tmp_path / "data"
    _sample_folder(data / "Test", cxr_dir, "test", {"normal": 3, "covid": 3})
    (data / "Test" / "normal").rename(data / "Test" / "Normal")
    (data / "Test" / "covid").rename(data / "Test" / "COVID-19")
    _sample_folder(data / "Test" / "Viral Pneumonia", cxr_dir, "test", {"pneumonia": 2})
    (data / "Test" / "scanner exports").mkdir()
    with caplog.at_level("WARNING", logger="training.evaluate"):
        m = evaluate(data, shipped_model, tmp_path / "eval", n_bootstrap=100)
    assert (m["n"], m["n_normal"], m["n_covid"]) == (6, 3, 3)
    assert m["pneumonia"]["n"] == 2
    assert "left out: scanner exports/ under" in caplog.text


def test_pneumonia_files_have_rows_and_a_broken_one_is_counted_rejected(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """A broken pneumonia file vanished from the counts, and no pneumonia file had a row
    in predictions.csv."""
    data = _sample_folder(tmp_path / "data", cxr_dir, "test", {"normal": 2, "covid": 2})
    _sample_folder(data / "pneumonia", cxr_dir, "test", {"pneumonia": 2})
    (data / "pneumonia" / "pneumonia" / "broken.png").write_bytes(b"not a png")
    m = evaluate(data, shipped_model, tmp_path / "eval", n_bootstrap=100)
    assert m["pneumonia"]["n"] == 2
    assert [Path(r["path"]).name for r in m["pneumonia"]["rejected"]] == ["broken.png"]
    assert "pneumonia (not in the binary figures): " in m["text"] and "1 rejected" in m["text"]
    with (tmp_path / "eval" / "predictions.csv").open(newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if r["label"] == "pneumonia"]
    assert sorted(r["status"] for r in rows) == ["rejected", "screened", "screened"]


def test_mask_folders_beside_the_films_are_left_out(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The COVID-19 Radiography Database keeps ``COVID/images/`` beside ``COVID/masks/``:
    the masks were scored as films (a 12-film set's AUC fell from 1.0 to 0.83)."""
    data = tmp_path / "data"
    for label in ("normal", "covid"):
        _sample_folder(data / label.upper() / "images", cxr_dir, "test", {label: 3})
        masks = data / label.upper() / "masks"
        masks.mkdir(parents=True)
        _sample_folder(data / label.upper() / "no-mask", cxr_dir, "test", {label: 1})
        for film in (data / label.upper() / "images" / label).iterdir():
            mask = np.zeros((64, 64), np.uint8)
            mask[10:50, 8:28] = mask[10:50, 36:56] = 255
            Image.fromarray(mask).save(masks / film.name)
    with caplog.at_level("WARNING", logger="training.data"):
        m = evaluate(data, shipped_model, tmp_path / "eval", n_bootstrap=100)
    assert (m["n"], m["rejected"]) == (8, []), "a folder named no-mask/ holds films"
    assert "left out: 6 images in mask folders under" in caplog.text


def test_a_site_threshold_sets_the_operating_point_but_never_the_card(
    model_copy: Path, test_sample: Callable[[int], Path], tmp_path: Path
) -> None:
    """CXR_THRESHOLD set the label predict gave but not the figures evaluate reported."""
    data = test_sample(3)
    m = evaluate(data, model_copy, tmp_path / "eval", threshold=0.999, n_bootstrap=100)
    assert m["threshold"] == 0.999 and "at threshold 0.9990" in m["text"]
    with pytest.raises(UserError, match="drop --threshold"):
        evaluate(data, model_copy, tmp_path / "e2", threshold=0.5, write_card=True)


def test_a_split_where_every_file_is_rejected_is_a_user_error(
    shipped_model: Path, tmp_path: Path
) -> None:
    """The message counts the reasons and names no file below the folder given: those
    folders can name patients (it quoted the first file's path)."""
    for label in ("normal", "covid"):
        (tmp_path / "data" / label / "DOE^JANE").mkdir(parents=True)
        (tmp_path / "data" / label / "DOE^JANE" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="none of the 2 normal/covid images") as refused:
        evaluate(tmp_path / "data", shipped_model, tmp_path / "eval", n_bootstrap=100)
    assert "(2 x unreadable: " in str(refused.value) and "DOE^JANE" not in str(refused.value)


def test_rethreshold_stores_the_validation_threshold_in_the_card(
    shipped_model: Path, model_copy: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from training.cli import app

    # Split folders are found whatever their case (a "Val/" folder was "no val/ folder").
    data = _sample_folder(tmp_path / "data" / "Val", cxr_dir, "val", {"normal": 10, "covid": 10})
    args = [
        "evaluate",
        str(tmp_path / "data"),
        "--model",
        str(model_copy),
        "--out",
        str(tmp_path / "e"),
    ]
    assert CliRunner().invoke(app, [*args, "--rethreshold"]).exit_code == 2  # not on test/
    both = [*args, "--split", "val", "--rethreshold", "--write-card"]
    assert CliRunner().invoke(app, both).exit_code == 2  # the card entry would be overwritten
    result = CliRunner().invoke(app, [*args, "--split", "VAL", "--rethreshold"])
    assert result.exit_code == 0, result.output

    card = json.loads((model_copy / "model_card.json").read_text())
    y = np.array([1 if p.parent.name == "covid" else 0 for p in sorted(data.rglob("*.png"))])
    scored = {
        Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "e" / "predictions.csv").open())
    }
    p = np.array([float(scored[q.name]["covid_probability"]) for q in sorted(data.rglob("*.png"))])
    assert card["threshold"] == pytest.approx(threshold_for_sensitivity(y, p, 0.97), abs=1e-6)
    assert card["threshold_rule"] == threshold_rule(0.97)
    val = card["metrics"]["val"]
    assert val["n"] == 20 and val["sensitivity"] == 1.0 and val["scored_with"] == "tflite"
    shipped = json.loads((shipped_model / "model_card.json").read_text())
    assert val["threshold"] == card["threshold"] != shipped["threshold"]
    # the shipped test figures were at the old threshold
    assert shipped["metrics"]["test"]["threshold"] == shipped["threshold"]
    assert card["metrics"]["test"] is None
    assert "removed metrics.test from the card" in result.output


def test_rethreshold_refuses_a_folder_without_val(
    model_copy: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """DATA/test --split val would fall back to DATA/test itself: the test images."""
    from typer.testing import CliRunner

    from training.cli import app

    card_before = (model_copy / "model_card.json").read_bytes()
    test = _sample_folder(tmp_path / "data" / "test", cxr_dir, "test", {"normal": 3, "covid": 3})
    args = ["evaluate", str(test), "--model", str(model_copy), "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(app, [*args, "--split", "val", "--rethreshold"])
    assert result.exit_code == 2, result.output
    assert "has no val/ folder" in result.output
    assert (model_copy / "model_card.json").read_bytes() == card_before
    assert not (tmp_path / "e").exists()


def test_rethreshold_on_a_val_without_covid_images_is_one_clear_error(
    model_copy: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """No positive to choose the threshold on: a ValueError traceback."""
    card_before = (model_copy / "model_card.json").read_bytes()
    _sample_folder(tmp_path / "data" / "val", cxr_dir, "val", {"normal": 4})
    with pytest.raises(UserError, match="no readable covid image to choose the threshold on"):
        evaluate(tmp_path / "data", model_copy, tmp_path / "e", split="val", rethreshold=True)
    assert (model_copy / "model_card.json").read_bytes() == card_before


def test_a_new_threshold_clears_the_test_figures_and_the_same_one_keeps_them(
    shipped_model: Path, tmp_path: Path
) -> None:
    y = np.array([1] * 20 + [0] * 30)
    p = np.concatenate([np.linspace(0.4, 0.99, 20), np.linspace(0.0, 0.5, 30)])
    threshold = threshold_for_sensitivity(y, p, 0.97)
    card = json.loads((shipped_model / "model_card.json").read_text())
    card["threshold"] = card["metrics"]["test"]["threshold"] = threshold
    (tmp_path / "model_card.json").write_text(json.dumps(card))

    same = store_threshold(tmp_path, y, p, "tflite")
    kept = json.loads((tmp_path / "model_card.json").read_text())["metrics"]["test"]
    assert same == {"previous": threshold, "threshold": threshold, "cleared": []}
    assert kept == card["metrics"]["test"]

    other = store_threshold(tmp_path, y, p * 0.9, "tflite")
    assert other["previous"] == threshold != other["threshold"] and other["cleared"] == ["test"]
    stored = json.loads((tmp_path / "model_card.json").read_text())
    assert stored["threshold"] == other["threshold"] and stored["metrics"]["test"] is None
