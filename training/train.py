"""Fit a network on ``DATA_DIR/train``, early-stop and threshold on ``DATA_DIR/val``, export.

The output folder holds ``model.keras`` (for Grad-CAM and retraining), ``model.tflite``
(what the worker runs; float32, input (N,S,S,1) in [0,1], dynamic batch, output (N,1)
P(covid)), ``model_card.json``, ``history.csv`` and ``training_curves.png``.
``DATA_DIR/test`` is never read here: ``evaluate --write-card`` adds the test figures.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import DEFAULT_MAX_PIXELS
from training import CLASS_NAMES, POSITIVE_CLASS
from training.data import (
    PNEUMONIA_POLICY,
    Augmentation,
    InputCache,
    Sample,
    class_weights,
    label_counts,
    list_split,
    make_dataset,
    manifest_sha256,
    readable_counts,
)
from training.models import DEFAULT_SIZES, build_model
from training.plots import plot_curves
from worker.errors import UserError
from worker.imaging.pipeline import (
    BAND_FRACTION,
    BAND_SMOOTHING,
    BORDER_FRACTION,
    PREPROCESSING_VERSION,
)
from worker.model import CARD_FILE, KERAS_FILE, TFLITE_FILE

log = logging.getLogger(__name__)

DEFAULT_TARGET_SENSITIVITY = 0.97
TFLITE_TOLERANCE = 1e-4
INPUT_CACHE_DIR = ".input-cache"
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
LR_SCHEDULES = ("plateau", "cosine")
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass
class TrainConfig:
    data_dir: Path
    out: Path
    arch: str = "compact"
    epochs: int = 35
    image_size: int | None = None
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "plateau"  # "plateau" (ReduceLROnPlateau on val AUC) or "cosine"
    patience: int = 8
    seed: int = 0
    weights: Path | None = None
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    name: str | None = None
    version: str = "1.0.0"
    time_budget_minutes: float | None = 25.0  # stop fitting before this (best epoch kept)
    max_train: int | None = None  # subsample (stratified, seeded) for quick runs/tests
    max_val: int | None = None
    precision: str = "auto"  # see resolve_precision
    max_pixels: int = DEFAULT_MAX_PIXELS  # the worker's CXR_MAX_PIXELS
    verbose: int | str = "auto"
    augmentation: Augmentation = field(default_factory=Augmentation)

    @property
    def size(self) -> int:
        return self.image_size or DEFAULT_SIZES[self.arch]


def set_seeds(seed: int) -> None:
    import keras
    import tensorflow as tf

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    keras.utils.set_random_seed(seed)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & CPU_BF16_FLAGS)


def resolve_precision(precision: str) -> str:
    """``auto`` trains in mixed bfloat16 where the CPU has bf16 instructions (AMX or
    AVX512-BF16: the shipped recipe took 21-23 min instead of 34 on a 2-core machine) and
    in float32 elsewhere (emulated bf16 is slower). The exported model is float32 either way."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "mixed_bfloat16" if cpu_has_bf16() else "float32"
    return precision


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def subsample(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """A seeded, label-stratified subset of about ``n`` samples (all if n is None)."""
    if n is None or n >= len(samples):
        return samples
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        group = [s for s in samples if s.label == label]
        k = max(1, round(n * len(group) / len(samples)))
        out += [group[i] for i in sorted(rng.choice(len(group), k, replace=False))]
    return sorted(out, key=lambda s: str(s.path))


def threshold_rule(target: float) -> str:
    return (
        f"midpoint between the lowest covid score that keeps sensitivity >= {target} on the "
        "validation split and the next lower validation score (the highest threshold's "
        "confusion matrix, robust to small runtime differences); predict covid when "
        "probability >= threshold"
    )


def fewest_positives(target: float, n: int) -> int:
    """The fewest of ``n`` positives whose share reaches ``target``, in exact arithmetic:
    in floating point 0.81 * 300 is 243.00000000000003, whose ceiling asks for 244."""
    return math.ceil(Fraction(str(target)) * n)


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The midpoint between the k-th highest positive score, k the fewest positives that
    reach ``target`` sensitivity, and the next lower score of either class (half of it if
    none): same confusion matrix as thresholding at that score, but a LiteRT score 1e-6
    lower no longer drops the positive."""
    positives = np.sort(p[y == 1])[::-1]
    if len(positives) == 0:
        raise UserError(
            "no readable covid image to choose the threshold on: the validation split "
            "needs covid/ images"
        )
    k = min(len(positives), max(1, fewest_positives(target, len(positives))))
    score = float(positives[k - 1])
    lower = p[p < score]
    return (score + (float(lower.max()) if len(lower) else 0.0)) / 2


def threshold_fields(y: np.ndarray, p: np.ndarray, target: float) -> dict[str, Any]:
    """The card's threshold and threshold_rule, and metrics.val, for validation scores."""
    threshold = threshold_for_sensitivity(y, p, target)
    return {
        "threshold": threshold,
        "threshold_rule": threshold_rule(target),
        "val": binary_summary(y, p, threshold),
    }


def binary_summary(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    pred = p >= threshold
    tp = int(((y == 1) & pred).sum())
    fn = int(((y == 1) & ~pred).sum())
    tn = int(((y == 0) & ~pred).sum())
    fp = int(((y == 0) & pred).sum())
    return {
        "n": len(y),
        "n_covid": int((y == 1).sum()),
        "n_normal": int((y == 0).sum()),
        "auc": float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "accuracy": (tp + tn) / len(y) if len(y) else None,
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "threshold": threshold,
    }


def predict_keras(
    model: Any,
    samples: list[Sample],
    size: int,
    batch_size: int,
    cache_dir: Path | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    ds = make_dataset(
        samples, size, batch_size, training=False, cache_dir=cache_dir, max_pixels=max_pixels
    )
    ys, ps = [], []
    for x, y in ds:
        ps.append(model(x, training=False).numpy().reshape(-1))
        ys.append(y.numpy().reshape(-1))
    return np.concatenate(ys).astype(int), np.concatenate(ps)


def export_tflite(model: Any, path: Path) -> bytes:
    """Float32 TFLite; the Keras input's batch dimension is None, so the batch is dynamic
    (the worker sizes it with ``resize_tensor_input``)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    # Keras prints the temporary SavedModel's signatures (40 lines of TensorSpec) to stdout
    with redirect_stdout(io.StringIO()):
        blob = converter.convert()
    path.write_bytes(blob)
    return blob


def verify_tflite(model: Any, path: Path, inputs: np.ndarray) -> float:
    """Max |keras - tflite| over ``inputs`` at two batch sizes; raises above tolerance."""
    from ai_edge_litert.interpreter import Interpreter

    expected = model(inputs, training=False).numpy().reshape(-1)
    interp = Interpreter(model_path=str(path), num_threads=1)
    idx_in = interp.get_input_details()[0]["index"]
    idx_out = interp.get_output_details()[0]["index"]
    worst = 0.0
    for n in (1, len(inputs)):
        interp.resize_tensor_input(idx_in, [n, *inputs.shape[1:]])
        interp.allocate_tensors()
        interp.set_tensor(idx_in, inputs[:n].astype(np.float32))
        interp.invoke()
        got = interp.get_tensor(idx_out).reshape(-1)
        worst = max(worst, float(np.abs(got - expected[:n]).max()))
    if worst > TFLITE_TOLERANCE:
        raise RuntimeError(f"TFLite export differs from Keras by {worst:.2e} > {TFLITE_TOLERANCE}")
    return worst


def TimeBudget(seconds: float) -> Any:
    """Stop before the next epoch would end past ``seconds`` of fitting (EarlyStopping
    still restores the best epoch's weights at the end of training)."""
    import keras

    class _TimeBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.start = time.perf_counter()
            self.last = self.start
            self.stopped_epoch: int | None = None

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            now = time.perf_counter()
            epoch_time, self.last = now - self.last, now
            if now - self.start + epoch_time > seconds:
                self.stopped_epoch = epoch + 1
                self.model.stop_training = True
                log.info("time budget of %.0f s reached after epoch %d", seconds, epoch + 1)

    return _TimeBudget()


def compile_model(model: Any, cfg: TrainConfig, steps: int) -> None:
    """Adam with the configured schedule, class-weighted BCE, AUC as the metric."""
    import keras

    if cfg.lr_schedule == "cosine":
        lr: Any = keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, (cfg.epochs - 1) * steps),
            alpha=0.01,
            warmup_target=cfg.learning_rate,
            warmup_steps=steps,
        )
    elif cfg.lr_schedule == "plateau":
        lr = cfg.learning_rate
    else:
        raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r} (plateau or cosine)")
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000)],
    )


def callbacks(cfg: TrainConfig, out: Path) -> list[Any]:
    """Early stopping on val AUC (best epoch restored), the CSV log, the schedule, the budget."""
    import keras

    found: list[Any] = [
        keras.callbacks.EarlyStopping(
            monitor="val_auc",
            mode="max",
            patience=cfg.patience,
            restore_best_weights=True,
            verbose=1,
        ),
        keras.callbacks.CSVLogger(str(out / "history.csv")),
    ]
    if cfg.lr_schedule == "plateau":
        found.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_auc", mode="max", factor=0.3, patience=2, min_lr=1e-5, verbose=1
            )
        )
    if cfg.time_budget_minutes:
        found.append(TimeBudget(cfg.time_budget_minutes * 60))
    return found


def readable_split_counts(
    samples: list[Sample], split: str, size: int, cache_dir: Path, max_pixels: int
) -> dict[str, int]:
    """Images per label of one split that decode (into the input cache). Each class needs
    one: train for its class weights, val for early stopping and the threshold."""
    found = readable_counts(samples, size, cache_dir, max_pixels)
    unreadable = len(samples) - sum(found.values())
    if unreadable:
        log.warning(
            "%d %s images cannot be read and are left out (`cxr-screen predict` on the "
            "folder gives each one's reason)",
            unreadable,
            split,
        )
    if len(found) < 2:
        raise UserError(f"{split}/ needs readable normal/ and covid/ images")
    return found


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training; returns the model card (also written to ``cfg.out``)."""

    started = time.perf_counter()
    set_seeds(cfg.seed)
    size = cfg.size
    precision = resolve_precision(cfg.precision)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    train_samples = subsample(list_split(cfg.data_dir, "train"), cfg.max_train, cfg.seed)
    val_samples = subsample(list_split(cfg.data_dir, "val"), cfg.max_val, cfg.seed)
    if len({s.label for s in train_samples}) < 2 or len({s.label for s in val_samples}) < 2:
        raise UserError("train/ and val/ both need normal/ and covid/ images")
    cache_dir = out / INPUT_CACHE_DIR
    try:
        used = readable_split_counts(train_samples, "train", size, cache_dir, cfg.max_pixels)
        unreadable = len(train_samples) - sum(used.values())
        val_used = readable_split_counts(val_samples, "val", size, cache_dir, cfg.max_pixels)
        weights = class_weights(used)
        log.info("train %s, val %s, class weights %s", used, val_used, weights)
        train_ds = make_dataset(
            train_samples,
            size,
            cfg.batch_size,
            training=True,
            seed=cfg.seed,
            augmentation=cfg.augmentation,
            with_weights=weights,
            cache_dir=cache_dir,
            max_pixels=cfg.max_pixels,
        )
        val_ds = make_dataset(
            val_samples,
            size,
            cfg.batch_size,
            training=False,
            cache_dir=cache_dir,
            max_pixels=cfg.max_pixels,
        )
        with dtype_policy(precision):
            model = build_model(cfg.arch, size, cfg.weights)
            compile_model(model, cfg, steps=math.ceil(sum(used.values()) / cfg.batch_size))
            fit_started = time.perf_counter()
            hist = model.fit(
                train_ds,
                validation_data=val_ds,
                epochs=cfg.epochs,
                callbacks=callbacks(cfg, out),
                verbose=cfg.verbose,
            )
            fit_seconds = time.perf_counter() - fit_started
        # Export a float32 copy (what the worker runs; also keeps the optimizer state out
        # of model.keras), and choose the threshold on that copy's own outputs.
        shipped = build_model(cfg.arch, size)
        shipped.set_weights(model.get_weights())
        y_val, p_val = predict_keras(
            shipped, val_samples, size, cfg.batch_size, cache_dir, cfg.max_pixels
        )
        # readable inputs (the first val files may all be unreadable)
        probe = np.array(InputCache.build(val_samples, size, cache_dir, cfg.max_pixels).inputs[:8])
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}

    chosen = threshold_fields(y_val, p_val, cfg.target_sensitivity)

    # An old card beside new weights would be read as theirs if this run stopped here.
    (out / CARD_FILE).unlink(missing_ok=True)
    shipped.save(out / KERAS_FILE)
    export_tflite(shipped, out / TFLITE_FILE)
    tflite_diff = verify_tflite(shipped, out / TFLITE_FILE, probe)

    plot_curves(
        history,
        out / "training_curves.png",
        f"{cfg.arch} @ {size}px, best epoch {best_epoch(history)} "
        f"(val AUC {max(history['val_auc']):.4f})",
    )
    card = model_card(
        cfg,
        parameters=int(shipped.count_params()),
        history=history,
        chosen=chosen,
        counts={"training": used, "validation": label_counts(y_val)},
        unreadable=unreadable,
        weights=weights,
        manifest=manifest_sha256(train_samples, Path(cfg.data_dir)),
        seconds={"training": time.perf_counter() - started, "fit": fit_seconds},
        precision=precision,
        tflite_diff=tflite_diff,
    )
    write_card(out, card)
    return card


def model_card(
    cfg: TrainConfig,
    *,
    parameters: int,
    history: dict[str, list[float]],
    chosen: dict[str, Any],
    counts: dict[str, dict[str, int]],
    unreadable: int,
    weights: dict[int, float],
    manifest: str,
    seconds: dict[str, float],
    precision: str,
    tflite_diff: float,
) -> dict[str, Any]:
    """The model card of a finished run (``metrics.test`` filled in by evaluate)."""
    return {
        "name": cfg.name or f"cxr-{cfg.arch}",
        "version": cfg.version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": cfg.arch,
        "input_size": cfg.size,
        "input": "model_input(load_gray(path), input_size): (N,S,S,1) float32 in [0,1]",
        "output": "(N,1) sigmoid probability of covid",
        "preprocessing_version": PREPROCESSING_VERSION,
        "preprocessing": "worker.imaging.pipeline: uniform edge bands (noise averaged over "
        f"{BAND_SMOOTHING} px along each line) of at least {BAND_FRACTION:.0%} of a side "
        f"trimmed, {BORDER_FRACTION:.0%} border crop, resize, histogram equalisation",
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "threshold": chosen["threshold"],
        "threshold_rule": chosen["threshold_rule"],
        "target_sensitivity": cfg.target_sensitivity,
        "training_manifest_sha256": manifest,
        "training_manifest_rule": "sha256 of sorted '<path relative to DATA_DIR>\\t<label>\\n' "
        "lines of the training images",
        "training_counts": counts["training"],
        "training_unreadable": unreadable,
        "validation_counts": counts["validation"],
        "pneumonia_policy": PNEUMONIA_POLICY,
        "class_weights": {CLASS_NAMES[k]: v for k, v in weights.items()},
        "augmentation": asdict(cfg.augmentation),
        "parameters": parameters,
        "training_seconds": round(seconds["training"], 1),
        "fit_seconds": round(seconds["fit"], 1),
        "epochs_run": len(history["loss"]),
        "best_epoch": best_epoch(history),
        "hyperparameters": {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "patience": cfg.patience,
            "seed": cfg.seed,
            "optimizer": "adam",
            "precision": precision,
            "lr_schedule": "ReduceLROnPlateau(val_auc, 0.3, 2)"
            if cfg.lr_schedule == "plateau"
            else "1 epoch linear warm-up, then cosine decay to 1% over the remaining epochs",
            "early_stopping": f"val_auc, patience {cfg.patience}, restore best",
            "time_budget_minutes": cfg.time_budget_minutes,
            "weights": str(cfg.weights) if cfg.weights else None,
            "max_train": cfg.max_train,
            "max_val": cfg.max_val,
        },
        "tflite_max_abs_diff_vs_keras": tflite_diff,
        "metrics": {"val": chosen["val"], "test": None},
    }


def best_epoch(history: dict[str, list[float]]) -> int:
    """The epoch early stopping restored (1-based)."""
    return int(np.argmax(history["val_auc"])) + 1


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    (Path(model_dir) / CARD_FILE).write_text(to_json(card))


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(v) for v in value]
    return value


def to_json(value: Any) -> str:
    """Indented JSON with undefined figures (NaN, e.g. an AUC on one class) as null."""
    return json.dumps(_without_nan(value), indent=2, allow_nan=False) + "\n"
