from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from config.settings import get_settings
from training.cli import app, evaluate_command, predict_command, train_command
from worker.model import read_card

runner = CliRunner()


def test_commands_are_plain_functions() -> None:
    assert callable(train_command) and callable(evaluate_command) and callable(predict_command)
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "evaluate", "predict"):
        assert name in result.output


def test_predict_command_writes_csv(
    shipped_model: Path, sample_png: Path, tmp_path: Path, bad_files: dict[str, Path]
) -> None:
    out = tmp_path / "out.csv"
    result = runner.invoke(
        app,
        [
            "predict",
            str(sample_png),
            str(bad_files["text"]),
            "--model",
            str(shipped_model),
            "--csv",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "path,covid_probability,predicted_label,status,reason"
    assert ",screened," in lines[1] and ",rejected," in lines[2]


def test_predict_takes_the_threshold_from_the_settings_as_run_does(
    shipped_model: Path, sample_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    get_settings.cache_clear()
    labels = {}
    for threshold in ("0.0001", "0.9999"):
        monkeypatch.setenv("CXR_THRESHOLD", threshold)
        monkeypatch.setenv("CXR_MODEL", str(shipped_model))
        out = tmp_path / f"{threshold}.csv"
        result = runner.invoke(app, ["predict", str(sample_png), "--csv", str(out)])
        get_settings.cache_clear()
        assert result.exit_code == 0, result.output
        labels[threshold] = out.read_text().splitlines()[1].split(",")[2]
    assert labels == {"0.0001": "covid", "0.9999": "normal"}


def test_evaluate_never_overwrites_the_model_folders_evaluation_unless_told(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its evaluation/ is the shipped model's evidence, which README links to."""
    data = tmp_path / "site"
    for label in ("normal", "covid"):
        (data / label).mkdir(parents=True)
        for png in sorted((cxr_dir / "test" / label).glob("*.png"))[:3]:
            (data / label / png.name).symlink_to(png)
    model = tmp_path / "model"
    model.mkdir()
    for item in shipped_model.iterdir():
        if item.name != "evaluation":  # written through, on the old code
            (model / item.name).symlink_to(item)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", str(data), "--model", str(model)])
    assert result.exit_code == 0, result.output
    version = read_card(shipped_model).model_version  # two folders named model differ
    assert (tmp_path / "evaluation" / version / "metrics.json").is_file()
    assert not any(p.is_file() and not p.is_symlink() for p in model.rglob("*"))


def test_predict_with_a_folder_that_is_no_model_writes_nothing_but_the_error(
    sample_png: Path, tmp_path: Path
) -> None:
    """The CSV header went out before the model was loaded: a CSV with no rows."""
    result = runner.invoke(app, ["predict", str(sample_png), "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stdout == "" and "no model card" in result.stderr


def test_train_rejects_unknown_architecture(cxr_dir: Path, tmp_path: Path) -> None:
    """Any failure passed: without the check it was a KeyError traceback, exit 1."""
    result = runner.invoke(app, ["train", str(cxr_dir), "--arch", "resnet", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "--arch" in result.output and "choose one of compact" in result.output


def test_train_needs_train_and_val_folders(cxr_dir: Path, tmp_path: Path) -> None:
    """A folder of label folders would be both the training and the validation split."""
    flat = cxr_dir / "test"
    args = ["--out", str(tmp_path), "--image-size", "32", "--epochs", "1", "--max-train", "16"]
    result = runner.invoke(app, ["train", str(flat), *args, "--max-val", "16"])
    assert result.exit_code == 2, result.output
    assert "no train/ folder" in result.output


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_stops_before_fitting_when_a_split_has_no_readable_image_of_a_class(
    split: str, cxr_dir: Path, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    """Every covid file of the split is unreadable: no class weight (train), no early
    stopping or threshold on covid (val)."""
    data = tmp_path / "data"
    for part, label in itertools.product(("train", "val"), ("normal", "covid")):
        (data / part / label).mkdir(parents=True)
        if (part, label) == (split, "covid"):
            (data / part / label / "empty.png").symlink_to(bad_files["empty"])
            continue
        for png in sorted((cxr_dir / part / label).glob("*.png"))[:4]:
            (data / part / label / png.name).symlink_to(png)
    args = ["--out", str(tmp_path / "model"), "--image-size", "32", "--epochs", "1"]
    result = runner.invoke(app, ["train", str(data), *args])
    assert result.exit_code == 2, result.output
    assert f"{split}/ needs readable normal/ and covid/ images" in result.output
    assert not any((tmp_path / "model").iterdir())  # no history.csv: fitting never began


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_without_the_training_extra_say_what_to_install(
    command: str, tmp_path: Path
) -> None:
    """The worker install (and its image) has no TensorFlow or scikit-learn: one line,
    exit 2, and no output folder (evaluate made an empty one first)."""
    hide_training_extra = (
        "import sys; sys.modules['tensorflow'] = sys.modules['keras'] = None; "
        "sys.modules['sklearn'] = None; from worker.cli import app; app(sys.argv[1:])"
    )
    for label in ("normal", "covid"):
        (tmp_path / "data" / label).mkdir(parents=True)
        noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "data" / label / "film.png")
    (tmp_path / "work").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", hide_training_extra, command, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path / "work",
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: this command needs the training extra"), done.stderr
    assert "Traceback" not in done.stderr
    assert list((tmp_path / "work").iterdir()) == []


def _tiny_data(cxr_dir: Path, root: Path, per_label: int = 4) -> Path:
    for part, label in itertools.product(("train", "val"), ("normal", "covid")):
        (root / part / label).mkdir(parents=True)
        for png in sorted((cxr_dir / part / label).glob("*.png"))[:per_label]:
            (root / part / label / png.name).symlink_to(png)
    return root


@pytest.fixture()
def max_pixels(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], None]]:
    """Sets CXR_MAX_PIXELS for the commands' settings."""

    def set_limit(limit: int) -> None:
        monkeypatch.setenv("CXR_MAX_PIXELS", str(limit))
        get_settings.cache_clear()

    yield set_limit
    get_settings.cache_clear()


def test_predict_honours_cxr_max_pixels_as_run_does(
    shipped_model: Path, sample_png: Path, tmp_path: Path, max_pixels: Callable[[int], None]
) -> None:
    """The 224 x 224 film in DICOM: refused one pixel under its size, screened at it."""
    from tests.dicom_factory import base_dataset, png_pixels, write
    from worker.imaging.errors import RejectedInput
    from worker.imaging.pipeline import read_dicom_image

    film = write(base_dataset(png_pixels(sample_png)), tmp_path / "film.dcm")
    side = png_pixels(sample_png).shape[0]
    for limit, status in ((side * side - 1, "rejected"), (side * side, "screened")):
        max_pixels(limit)
        out = tmp_path / f"{limit}.csv"
        args = ["predict", str(film), "--model", str(shipped_model), "--csv", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        row = out.read_text().splitlines()[1]
        assert row.split(",")[3] == status, row
        if status == "rejected":
            assert f"over the limit of {limit} pixels" in row
            with pytest.raises(RejectedInput, match=f"over the limit of {limit} pixels"):
                read_dicom_image(film, limit)  # what run does with the setting


def test_evaluate_honours_cxr_max_pixels(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path, max_pixels: Callable[[int], None]
) -> None:
    data = _tiny_data(cxr_dir, tmp_path / "data", per_label=2)
    max_pixels(1000)
    args = ["--model", str(shipped_model), "--out", str(tmp_path / "e"), "--bootstrap", "100"]
    result = runner.invoke(app, ["evaluate", str(data / "val"), *args])
    assert result.exit_code == 2, result.output
    assert "over the limit of 1000 pixels" in result.output


def test_train_honours_cxr_max_pixels(
    cxr_dir: Path,
    tmp_path: Path,
    max_pixels: Callable[[int], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = _tiny_data(cxr_dir, tmp_path / "data")
    max_pixels(1000)
    args = ["--out", str(tmp_path / "model"), "--image-size", "32", "--epochs", "1"]
    result = runner.invoke(app, ["train", str(data), *args])
    assert result.exit_code == 2, result.output
    assert "train/ needs readable normal/ and covid/ images" in result.output
    assert "8 train images cannot be read and are left out" in caplog.text


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--image-size", "16", "compact needs at least 32 pixels"),
        ("--lr-schedule", "cosin", "plateau, cosine"),
        # the card would be refused by run and the worker after the whole fit
        ("--version", "1.0.0-" + "x" * 60, "is longer than 64 characters"),
        # trained on one image per class, thresholded on two, exit 0
        ("--max-train", "0", "greater than or equal to 1"),
        ("--max-val", "-3", "greater than or equal to 1"),
    ],
)
def test_train_checks_its_options_before_reading_any_image(
    option: str, value: str, message: str, cxr_dir: Path, tmp_path: Path
) -> None:
    """Both were tracebacks (exit 1) after the whole data set had been decoded."""
    data = _tiny_data(cxr_dir, tmp_path / "data")
    out = tmp_path / "model"
    args = ["--out", str(out), "--image-size", "32", "--epochs", "1", option, value]
    result = runner.invoke(app, ["train", str(data), *args])
    assert result.exit_code == 2, result.output
    assert option in result.output and message in result.output
    assert not out.exists()  # nothing decoded into its input cache


def test_ensemble_command_writes_a_model_the_worker_reads(
    shipped_model: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    from tests.training.test_ensemble import small_data_dir

    data = small_data_dir(cxr_dir, tmp_path / "data", per_label=10)
    out = tmp_path / "pair"
    members = [str(shipped_model), str(shipped_model)]
    args = ["ensemble", *members, "--data", str(data), "--out", str(out), "--version", "2.0.0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: val AUC" in result.output
    card = read_card(out)
    assert card.model_version == f"{read_card(shipped_model).name}-2.0.0"
    elsewhere = tmp_path / "long"
    too_long = runner.invoke(app, [*args[:-3], str(elsewhere), "--version", "9" * 80])
    assert too_long.exit_code == 2 and "longer than" in too_long.output
    assert not elsewhere.exists(), "refused before any work"
