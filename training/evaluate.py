"""Evaluate a model folder on labelled images: ``DATA_DIR/test/<label>/`` or ``DATA_DIR/<label>/``.

The task is binary, normal vs covid. ``pneumonia/`` images (if any) are NOT part of the
binary figures; they are reported separately (how many the model flags as covid at the
card threshold). Scoring is ``training.scoring``'s, the figures ``training.metrics``',
the PNGs ``training.plots``'.

``shortcut_audit`` adds ``training.audit``: AUC with the lung fields or all but the
border hidden, and a Grad-CAM grid. ``robustness`` re-scores under the acquisition shifts
of ``training.robustness`` (other framing, aspect ratio, resolution, compression, noise,
positioning, detector processing) and reports AUC, sensitivity and specificity at the
card threshold for each, with a bar chart.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import DEFAULT_MAX_PIXELS
from training import CLASS_NAMES
from training.audit import run_shortcut_audit
from training.data import (
    Sample,
    child_folder,
    folder_key,
    list_samples,
    manifest_sha256,
    split_dir,
    warn_left_out,
)
from training.metrics import ECE_BINS, as_text, binary_metrics
from training.plots import plot_confusion, plot_reliability, plot_robustness, plot_roc
from training.predict import COLUMNS, rejected_file, screened_file
from training.robustness import SHIFTS
from training.scoring import Scorer, score_altered, score_files
from training.train import (
    DEFAULT_TARGET_SENSITIVITY,
    subsample,
    threshold_fields,
    to_json,
)
from worker.csv_rows import write_csv_row
from worker.errors import UserError
from worker.model import CARD_FILE

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("path", "label", *COLUMNS[1:])  # predict's, with the folder's label
# Everything evaluate writes into its folder.
OUTPUT_FILES = (
    "metrics.json",
    "report.txt",
    "predictions.csv",
    "roc.png",
    "confusion_matrix.png",
    "reliability.png",
    "audit_examples.png",
    "gradcam_grid.png",
    "robustness.png",
)


def evaluate(
    data_dir: Path,
    model_dir: Path,
    out: Path,
    *,
    split: str = "test",
    shortcut_audit: bool = False,
    robustness: bool = False,
    use_keras: bool = False,
    write_card: bool = False,
    rethreshold: bool = False,
    threshold: float | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """With ``rethreshold`` (``DATA_DIR/val/`` only) the card's threshold is chosen again on
    this split's scores with the current rule and stored, with metrics.val, in the card.
    ``threshold`` replaces the card's (a site's ``CXR_THRESHOLD``) in the figures.
    Files over ``max_pixels`` (the worker's ``CXR_MAX_PIXELS``) are rejected as there."""
    model_dir, out = Path(model_dir), Path(out)
    check_options(Path(data_dir), split, model_dir, write_card, rethreshold, threshold)
    folder = split_dir(data_dir, split)
    out.mkdir(parents=True, exist_ok=True)
    warn_left_out(folder)
    samples = list_samples(folder, ("normal", "covid"))
    if not samples:
        raise FileNotFoundError(f"no normal/ or covid/ images under {folder}")
    pneumonia = list_samples(folder, ("pneumonia",))
    scorer = Scorer(model_dir, use_keras=use_keras)
    scored_with = "keras" if use_keras else "tflite"
    threshold = scorer.threshold if threshold is None else threshold

    probs, rejected = score_files([s.path for s in samples], scorer, scorer.size, max_pixels)
    ok = scored(samples, probs, rejected, folder)
    y, p = np.array([s.target for s in samples])[ok], probs[ok]
    good = [s for s, k in zip(samples, ok, strict=True) if k]
    card_change = None
    if rethreshold:
        card_change = store_threshold(model_dir, y, p, scored_with)
        threshold = card_change["threshold"]
    m = binary_metrics(y, p, threshold, n_bootstrap, seed)
    metrics: dict[str, Any] = {
        "model": scorer.card.model_version,
        "model_dir": str(model_dir),
        "scored_with": scored_with,
        "data": str(folder),
        "task": "binary normal vs covid; pneumonia reported separately",
        **m,
        "rejected": rejected_rows(rejected),
    }
    if card_change is not None:
        metrics["card_threshold"] = card_change
    pneumonia_probs, pneumonia_rejected = score_files(
        [s.path for s in pneumonia], scorer, scorer.size, max_pixels
    )
    if pneumonia:
        metrics["pneumonia"] = pneumonia_summary(pneumonia_probs, pneumonia_rejected, threshold)

    for output in OUTPUT_FILES:  # an earlier run's audit or shifts must not pass for this one's
        (out / output).unlink(missing_ok=True)
    name = f"{scorer.card.model_version} ({scored_with})"
    plot_roc(y, p, m, out / "roc.png", f"ROC - {name}")
    plot_confusion(m, out / "confusion_matrix.png", f"{split} @ {threshold:.3f}")
    plot_reliability(m, out / "reliability.png", f"Reliability - {name}")
    write_predictions(
        [*samples, *pneumonia],
        np.concatenate([probs, pneumonia_probs]),
        dict(rejected + pneumonia_rejected),
        threshold,
        out / "predictions.csv",
    )
    if shortcut_audit:
        metrics["shortcut_audit"] = run_shortcut_audit(
            scorer, model_dir, good, y, p, m["auc"], threshold, out, max_pixels, seed
        )
    if robustness:
        shifts = score_altered(
            SHIFTS, [s.path for s in good], y, scorer, scorer.size, threshold, max_pixels=max_pixels
        )
        metrics["robustness"] = {"shifts": shifts, "png": "robustness.png"}
        plot_robustness(m, shifts, out / "robustness.png")

    metrics["text"] = summary_text(metrics)
    (out / "metrics.json").write_text(to_json(metrics))
    (out / "report.txt").write_text(metrics["text"] + "\n")
    if write_card:
        _store_in_card(model_dir, split, metrics)
    return metrics


def check_options(
    data_dir: Path,
    split: str,
    model_dir: Path,
    write_card: bool,
    rethreshold: bool,
    threshold: float | None,
) -> None:
    """Refuse, before anything is scored or written, what would store wrong figures."""
    if rethreshold:
        check_rethreshold(data_dir, split, write_card)
    if threshold is not None and (rethreshold or write_card):
        raise UserError(
            "the card keeps figures at its own threshold: drop --threshold (or CXR_THRESHOLD) "
            "with --write-card or --rethreshold"
        )
    if write_card:
        check_training_data(data_dir, split, model_dir)


def scored(
    samples: Sequence[Sample],
    probs: np.ndarray,
    rejected: list[tuple[Path, str]],
    folder: Path,
) -> np.ndarray:
    """Which samples have a score; none is an error, one class only a warning."""
    ok = ~np.isnan(probs)
    if not ok.any():
        # Reasons, not paths: the folders below the one given can name patients.
        reasons = Counter(reason for _, reason in rejected).most_common(3)
        raise UserError(
            f"none of the {len(samples)} normal/covid images under {folder} could be scored "
            f"({'; '.join(f'{n} x {reason}' for reason, n in reasons)})"
        )
    targets = {s.target for s, k in zip(samples, ok, strict=True) if k}
    if len(targets) < 2:
        (target,) = targets
        log.warning(
            "only %s images could be scored under %s: AUC, %s and the predictive values "
            "need both normal and covid images (n/a below)",
            CLASS_NAMES[target],
            folder,
            "specificity" if target else "sensitivity",
        )
    return ok


def rejected_rows(rejected: list[tuple[Path, str]]) -> list[dict[str, str]]:
    return [{"path": str(path), "reason": reason} for path, reason in rejected]


def pneumonia_summary(
    probs: np.ndarray, rejected: list[tuple[Path, str]], threshold: float
) -> dict[str, Any]:
    """Pneumonia films are outside the binary task: how many the threshold flags."""
    scored_probs = probs[~np.isnan(probs)]
    return {
        "n": len(scored_probs),
        "flagged_covid": int((scored_probs >= threshold).sum()),
        "mean_probability": float(scored_probs.mean()) if len(scored_probs) else None,
        "rejected": rejected_rows(rejected),
    }


def _store_in_card(model_dir: Path, split: str, metrics: dict[str, Any]) -> None:
    card_path = Path(model_dir) / CARD_FILE
    card = json.loads(card_path.read_text())
    keep = (
        "n",
        "n_covid",
        "n_normal",
        "auc",
        "auc_ci95",
        "threshold",
        "sensitivity",
        "specificity",
        "accuracy",
        "confusion_matrix",
        "predictive_values",
        "pneumonia",
        "scored_with",
        "data",
    )
    entry = {k: metrics[k] for k in keep if k in metrics}
    entry["ece"] = metrics["calibration"]["ece"]
    if "shortcut_audit" in metrics:
        entry["shortcut_audit_auc"] = {
            k: v["auc"]
            for k, v in metrics["shortcut_audit"].items()
            if isinstance(v, dict) and "auc" in v
        }
    if "robustness" in metrics:
        entry["robustness_auc"] = {k: v["auc"] for k, v in metrics["robustness"]["shifts"].items()}
    card.setdefault("metrics", {})[split] = entry
    card_path.write_text(to_json(card))


def check_training_data(data_dir: Path, split: str, model_dir: Path) -> None:
    """--write-card files the figures as the model's own: only for a split of the data set
    it was trained on (DATA_DIR/train/ matching the card's training manifest), never for
    a folder of one's own films, which overwrote the shipped test figures."""
    card = json.loads((model_dir / CARD_FILE).read_text())
    train = child_folder(data_dir, "train")
    used = card.get("hyperparameters", {})  # a --max-train model hashed its subset
    trained_on = train is not None and card.get("training_manifest_sha256") == manifest_sha256(
        subsample(list_samples(train), used.get("max_train"), used.get("seed", 0)), data_dir
    )
    if child_folder(data_dir, split) is None or not trained_on:
        raise UserError(
            f"--write-card stores figures in the model card, for a split of the data the "
            f"model was trained on: {data_dir} has no {split}/ beside a train/ that matches "
            "the card's training manifest (evaluate your own folder without --write-card)"
        )


def check_rethreshold(data_dir: Path, split: str, write_card: bool) -> None:
    """--rethreshold needs a real ``DATA_DIR/val/``: ``split_dir`` falls back to DATA_DIR
    itself, so ``DATA/test --split val`` would choose the threshold on the test images."""
    if folder_key(split) != "val":
        raise UserError("the threshold is chosen on the validation split: use --split val")
    if write_card:
        raise UserError("--rethreshold stores metrics.val in the card itself: drop --write-card")
    if child_folder(data_dir, "val") is None:
        raise UserError(
            f"--rethreshold chooses the threshold on DATA_DIR/val/ and {data_dir} has no val/ "
            "folder: pass the folder that holds val/"
        )


def store_threshold(
    model_dir: Path, y: np.ndarray, p: np.ndarray, scored_with: str
) -> dict[str, Any]:
    """Choose the threshold on validation scores (y, p) with the current rule and store it,
    the rule and metrics.val in the model card. Stored figures of other splits at another
    threshold (metrics.test) no longer describe the card and are cleared. Returns the
    previous and the new threshold and the cleared splits."""
    card_path = Path(model_dir) / CARD_FILE
    card = json.loads(card_path.read_text())
    target = float(card.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    chosen = threshold_fields(y, p, target)
    change = {
        "previous": card["threshold"],
        "threshold": float(chosen["threshold"]),
        "cleared": stale_metrics(card.get("metrics", {}), chosen["threshold"]),
    }
    card["threshold"], card["threshold_rule"] = chosen["threshold"], chosen["threshold_rule"]
    metrics = card.setdefault("metrics", {})
    metrics["val"] = {**chosen["val"], "scored_with": scored_with}
    metrics.update(dict.fromkeys(change["cleared"]))
    card_path.write_text(to_json(card))
    return change


def stale_metrics(metrics: dict[str, Any], threshold: float) -> list[str]:
    """The stored splits other than val whose figures are not at ``threshold``."""
    return sorted(
        split
        for split, figures in metrics.items()
        if split != "val" and figures is not None and figures.get("threshold") != threshold
    )


def write_predictions(
    samples: Sequence[Sample],
    probs: np.ndarray,
    reasons: Mapping[Path, str],
    threshold: float,
    path: Path,
) -> None:
    """One row per listed file, pneumonia included: the columns of ``predict`` after
    the folder's label."""
    # backslashreplace: a file name that is not UTF-8 still gives a valid UTF-8 CSV
    with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as stream:
        write_csv_row(stream, PREDICTION_COLUMNS)
        for sample, q in zip(samples, probs, strict=True):
            if sample.path in reasons:
                prediction = rejected_file(sample.path, reasons[sample.path])
            else:
                prediction = screened_file(sample.path, float(q), threshold)
            write_csv_row(stream, (sample.path, sample.label, *prediction.row()[1:]))


def card_change_text(change: dict[str, Any]) -> list[str]:
    lines = [
        f"card threshold {change['previous']:.4f} -> {change['threshold']:.4f}, chosen on "
        "this split and stored with metrics.val"
    ]
    for split in change["cleared"]:
        lines.append(
            f"removed metrics.{split} from the card: its figures were at another threshold "
            f"(evaluate {split}/ with --write-card again)"
        )
    return lines


def summary_text(m: dict[str, Any]) -> str:
    lines = [
        f"model {m['model']} scored with {m['scored_with']} on {m['data']}",
        f"binary normal vs covid: {m['n']} images ({m['n_normal']} normal, {m['n_covid']} covid)"
        f", {len(m['rejected'])} rejected",
        "",
        m["classification_report_text"],
        f"confusion matrix [rows true normal, covid; cols predicted]: "
        f"{m['confusion_matrix']['matrix']}",
        f"ROC AUC {as_text(m['auc'])} (95% bootstrap CI {as_text(m['auc_ci95'][0])}-"
        f"{as_text(m['auc_ci95'][1])}, {m['bootstrap_resamples']} resamples)",
        f"at threshold {m['threshold']:.4f}: sensitivity {as_text(m['sensitivity'])}, "
        f"specificity {as_text(m['specificity'])}",
    ]
    for pv in m["predictive_values"]:
        lines.append(
            f"  prevalence {pv['prevalence']:.0%}: "
            f"PPV {as_text(pv['ppv'])}, NPV {as_text(pv['npv'])}"
        )
    lines.append(f"expected calibration error ({ECE_BINS} bins): {m['calibration']['ece']:.4f}")
    if "pneumonia" in m:
        pn = m["pneumonia"]
        lines.append(
            f"pneumonia (not in the binary figures): {pn['flagged_covid']} of {pn['n']} "
            f"flagged covid, {len(pn['rejected'])} rejected"
        )
    if "shortcut_audit" in m:
        a = m["shortcut_audit"]
        lines.append(
            "shortcut audit (AUC): "
            + ", ".join(
                f"{k} {as_text(v['auc'])}"
                for k, v in a.items()
                if isinstance(v, dict) and "auc" in v
            )
        )
    if "robustness" in m:
        lines.append(
            "acquisition shifts (AUC / sens / spec): "
            + ", ".join(
                f"{k} {as_text(v['auc'])} / {as_text(v['sensitivity'], 3)} / "
                f"{as_text(v['specificity'], 3)}"
                for k, v in m["robustness"]["shifts"].items()
            )
        )
    if "card_threshold" in m:
        lines += card_change_text(m["card_threshold"])
    return "\n".join(lines)
