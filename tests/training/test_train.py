"""A short, real training run on a small subset, then its evaluation (< 2 min on 2 cores)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from training.train import (
    INPUT_CACHE_DIR,
    TimeBudget,
    cpu_has_bf16,
    resolve_precision,
    subsample,
    threshold_for_sensitivity,
)

SIZE = 64
MAX_TRAIN = 1000
MAX_VAL = 160
EPOCHS = 10
AUC_BAR = 0.80  # chance is 0.5; measured 0.88 (160 balanced test images) on 2 busy cores


def test_threshold_keeps_the_highest_thresholds_counts_with_a_margin() -> None:
    y = np.array([1] * 20 + [0] * 5)
    p = np.concatenate([np.linspace(0.05, 0.99, 20), np.full(5, 0.5)])
    t = threshold_for_sensitivity(y, p, 0.95)
    kth = np.sort(p[y == 1])[1]  # the 19th of 20 positives: sensitivity 0.95
    lower = p[p < kth].max()
    assert t == pytest.approx((kth + lower) / 2)
    np.testing.assert_array_equal(p >= t, p >= kth)  # same confusion matrix
    # a runtime that scores every image 1e-6 lower keeps the sensitivity
    assert ((p - 1e-6 >= t) & (y == 1)).sum() / 20 >= 0.95
    assert threshold_for_sensitivity(y, p, 1.0) == pytest.approx(p.min() / 2)


@pytest.mark.parametrize(
    ("target", "n_covid", "kept"),
    [
        (0.81, 300, 243),
        (0.56, 25, 14),
        (0.55, 100, 55),
        (0.68, 75, 51),
        (0.97, 200, 194),
        (0.97, 199, 194),
        (1.0, 7, 7),
        (0.5, 1, 1),
    ],
)
def test_threshold_keeps_the_fewest_positives_that_reach_the_target(
    target: float, n_covid: int, kept: int
) -> None:
    y = np.array([1] * n_covid + [0] * 50)
    p = np.concatenate([np.linspace(0.99, 0.3, n_covid), np.linspace(0.0, 0.6, 50)])
    t = threshold_for_sensitivity(y, p, target)
    assert int(((p >= t) & (y == 1)).sum()) == kept


def test_precision_auto_follows_the_cpu_flags(tmp_path: Path) -> None:
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    plain = tmp_path / "plain"
    plain.write_text("flags\t\t: fpu sse2 avx2\n")
    assert cpu_has_bf16(amx) and not cpu_has_bf16(plain)
    assert not cpu_has_bf16(tmp_path / "missing")
    expected = "mixed_bfloat16" if cpu_has_bf16() else "float32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("float16")


def test_subsample_is_seeded_and_stratified(cxr_dir: Path) -> None:
    from training.data import counts, list_split

    full = list_split(cxr_dir, "train")
    a, b = subsample(full, 200, 3), subsample(full, 200, 3)
    assert a == b and abs(len(a) - 200) <= 1
    share = counts(a)["covid"] / len(a)
    assert share == pytest.approx(counts(full)["covid"] / len(full), abs=0.01)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_training_history(cxr_dir: Path, tmp_path: Path) -> None:
    """Two tiny runs: every epoch's figures repeat, not only the first ones."""
    from training.train import TrainConfig, train

    histories = []
    for run in ("a", "b"):
        cfg = TrainConfig(
            data_dir=cxr_dir,
            out=tmp_path / run,
            image_size=SIZE,
            epochs=3,
            max_train=96,
            max_val=64,
            seed=3,
            verbose=0,
        )
        train(cfg)
        histories.append((tmp_path / run / "history.csv").read_text())
    assert histories[0] == histories[1]
    assert len(histories[0].splitlines()) == 4


@pytest.mark.slow
def test_short_training_run_beats_chance(
    cxr_dir: Path, test_sample: Callable[[int], Path], shipped_model: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from training.cli import app
    from training.evaluate import evaluate

    out = tmp_path / "model"
    started = time.perf_counter()
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(cxr_dir),
            "--out",
            str(out),
            "--image-size",
            str(SIZE),
            "--epochs",
            str(EPOCHS),
            "--max-train",
            str(MAX_TRAIN),
            "--max-val",
            str(MAX_VAL),
            "--seed",
            "0",
            "--patience",
            str(EPOCHS),
            "--processing-augmentation",
            "0.3",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "model.keras",
        "model.tflite",
        "model_card.json",
        "training_curves.png",
        "history.csv",
    ):
        assert (out / name).is_file(), name
    assert not (out / INPUT_CACHE_DIR).exists()  # the decoded-input cache is removed
    card = json.loads((out / "model_card.json").read_text())
    assert card["input_size"] == SIZE and 0 < card["threshold"] < 1
    assert card["metrics"]["val"]["sensitivity"] >= card["target_sensitivity"]
    assert card["tflite_max_abs_diff_vs_keras"] <= 1e-4
    assert card["hyperparameters"]["precision"] == resolve_precision("auto")
    assert card["augmentation"]["unsharp_prob"] == 0.3
    # what preprocessing version 4 does: the bands trimmed were left out of the text
    assert (
        card["preprocessing"]
        == json.loads((shipped_model / "model_card.json").read_text())["preprocessing"]
    )
    import keras

    assert keras.mixed_precision.global_policy().name == "float32"  # restored after training

    # evaluation on a balanced, seeded sample of the test split the run never saw
    metrics = evaluate(test_sample(80), out, tmp_path / "eval", n_bootstrap=200)
    elapsed = time.perf_counter() - started
    print(metrics["text"], f"\nshort run + evaluation: {elapsed:.0f} s")
    assert metrics["n"] == 160
    assert metrics["auc"] > AUC_BAR, metrics["text"]
    assert (tmp_path / "eval" / "metrics.json").is_file()
    for png in ("roc.png", "confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "eval" / png).is_file()


def tiny_data_set(cxr_dir: Path, root: Path, per_class: int) -> Path:
    """``per_class`` linked PNGs per label in train/ and val/."""
    for split in ("train", "val"):
        for label in ("normal", "covid"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for png in sorted((cxr_dir / split / label).glob("*.png"))[:per_class]:
                (folder / png.name).symlink_to(png)
    return root


@pytest.mark.slow
def test_unreadable_first_val_files_do_not_lose_the_run_or_mix_two_models(
    cxr_dir: Path, shipped_model: Path, tmp_path: Path
) -> None:
    """The tflite check batch was the first 8 val files, unreadable ones included: the run
    died after the whole fit, leaving the new weights beside the old model's card."""
    from training.train import TrainConfig, train
    from worker.model import Classifier

    data = tiny_data_set(cxr_dir, tmp_path / "data", 24)
    for i in range(8):
        (data / "val" / "covid" / f"0000-corrupt-{i}.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "model"
    out.mkdir()
    shutil.copy2(shipped_model / "model_card.json", out / "model_card.json")  # 160 px
    card = train(TrainConfig(data_dir=data, out=out, image_size=SIZE, epochs=1, seed=0, verbose=0))
    assert card["input_size"] == SIZE and card["tflite_max_abs_diff_vs_keras"] <= 1e-4
    assert Classifier(out).input_size == SIZE


@pytest.mark.slow
def test_the_card_records_the_training_and_validation_subsets(
    cxr_dir: Path, tmp_path: Path
) -> None:
    """--max-train / --max-val left no trace in the card's hyperparameters."""
    from training.train import TrainConfig, train

    data = tiny_data_set(cxr_dir, tmp_path / "data", 12)
    cfg = TrainConfig(
        data_dir=data,
        out=tmp_path / "model",
        image_size=32,
        epochs=1,
        max_train=16,
        max_val=8,
        precision="float32",
        verbose=0,
    )
    hyperparameters = train(cfg)["hyperparameters"]
    assert (hyperparameters["max_train"], hyperparameters["max_val"]) == (16, 8)


def test_a_split_with_no_readable_image_is_one_clear_error(cxr_dir: Path, tmp_path: Path) -> None:
    """Numpy cannot map the empty input cache: a traceback instead of the message."""
    from training.train import TrainConfig, train
    from worker.errors import UserError

    data = tiny_data_set(cxr_dir, tmp_path / "data", 2)
    for png in (data / "train").rglob("*.png"):
        png.unlink()
        png.write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match=r"train/ needs readable normal/ and covid/ images"):
        train(TrainConfig(data_dir=data, out=tmp_path / "model", image_size=SIZE, verbose=0))


def test_time_budget_stops_before_an_epoch_would_end_past_it() -> None:
    import keras

    x, y = np.zeros((8, 4), np.float32), np.zeros((8, 1), np.float32)

    def fit(seconds: float) -> tuple[int, int | None]:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        budget = TimeBudget(seconds)
        history = model.fit(x, y, epochs=5, verbose=0, callbacks=[budget])
        return len(history.history["loss"]), budget.stopped_epoch

    assert fit(0.0) == (1, 1)  # the first epoch's time alone is past it
    assert fit(3600.0) == (5, None)
