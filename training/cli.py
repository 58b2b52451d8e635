"""``cxr-screen train|evaluate|predict``.

Each command is a plain typed function, so the main CLI can mount the whole ``app``
(``app.add_typer``) or register single commands (``cli.command("train")(train_command)``).
TensorFlow is imported inside the commands only.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from config.settings import get_settings
from training.models import ARCHITECTURES, MIN_SIZES
from worker.cli_common import existing_paths, user_errors
from worker.model import MAX_MODEL_VERSION, read_card

SIGPIPE_EXIT = 141  # as a shell reports a command ended by SIGPIPE

app = typer.Typer(
    help="Train, evaluate and run the COVID-19 radiograph classifier.",
    no_args_is_help=True,
    add_completion=False,
)


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def check_choice(value: str, choices: Sequence[str], option: str) -> None:
    if value not in choices:
        raise typer.BadParameter(f"choose one of {', '.join(choices)}", param_hint=option)


def check_image_size(arch: str, image_size: int | None) -> None:
    """Before any image is decoded: the network is built only after the data set is read."""
    if image_size is not None and image_size < MIN_SIZES[arch]:
        raise typer.BadParameter(
            f"{arch} needs at least {MIN_SIZES[arch]} pixels", param_hint="--image-size"
        )


def check_model_version(model_version: str) -> None:
    """Before the fit: the worker and run would refuse the card it ends with."""
    if len(model_version) > MAX_MODEL_VERSION:
        raise typer.BadParameter(
            f"{model_version!r} is longer than {MAX_MODEL_VERSION} characters",
            param_hint="--name/--version",
        )


@user_errors
def train_command(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder with train/ and val/, one sub-folder "
            "per label (normal/, covid/, pneumonia/).",
            exists=True,
            file_okay=False,
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output model folder (default: runs/<arch>).")
    ] = None,
    arch: Annotated[
        str, typer.Option(help="compact | residual | alexnet | vgg16 | inceptionv3")
    ] = "compact",
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs (early stopping on val AUC).")
    ] = 35,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Input side in pixels (default: 160 compact/residual, 224 alexnet/vgg16, "
            "299 inceptionv3)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option()] = 1e-3,
    lr_schedule: Annotated[
        str,
        typer.Option(
            help="plateau (ReduceLROnPlateau on val AUC) or cosine (warm-up + cosine decay)."
        ),
    ] = "plateau",
    patience: Annotated[int, typer.Option(min=1, help="Early-stopping patience (epochs).")] = 8,
    seed: Annotated[int, typer.Option(help="Seeds python, numpy and TensorFlow.")] = 0,
    weights: Annotated[
        Path | None,
        typer.Option(
            help="Local weights file (whole model, or an "
            "ImageNet no-top file for vgg16/inceptionv3)."
            " Never downloaded.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    target_sensitivity: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=1.0,
            help="The threshold keeps this sensitivity on val/ (midway between the covid "
            "score that reaches it and the next lower score).",
        ),
    ] = 0.97,
    name: Annotated[
        str | None, typer.Option(help="Model name in the card (default: cxr-<arch>).")
    ] = None,
    version: Annotated[str, typer.Option(help="Model version in the card.")] = "1.0.0",
    time_budget: Annotated[
        float | None,
        typer.Option(help="Stop fitting after about this many minutes (best epoch kept)."),
    ] = 25.0,
    max_train: Annotated[
        int | None,
        typer.Option(min=1, help="Use a stratified random subset of this many training images."),
    ] = None,
    max_val: Annotated[int | None, typer.Option(min=1, help="Same for val/.")] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (mixed_bfloat16 where the CPU has bf16 instructions, else float32), "
            "float32 or mixed_bfloat16. The exported model is float32 either way."
        ),
    ] = "auto",
    processing_augmentation: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of training images given random unsharp masking or smoothing "
            "(detector processing varies between hospitals); 0 = off.",
        ),
    ] = 0.0,
    text_augmentation: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of training images given burnt-in marker text (L/R, PORTABLE, a "
            "date) anywhere in the input; 0 = off.",
        ),
    ] = 0.0,
) -> None:
    """Fit on DATA_DIR/train, early-stop and pick the threshold on DATA_DIR/val, export."""
    _quiet_tensorflow()
    from training.data import Augmentation
    from training.train import LR_SCHEDULES, PRECISIONS, TrainConfig, train

    check_choice(arch, ARCHITECTURES, "--arch")
    check_choice(precision, PRECISIONS, "--precision")
    check_choice(lr_schedule, LR_SCHEDULES, "--lr-schedule")
    check_image_size(arch, image_size)
    check_model_version(f"{name or f'cxr-{arch}'}-{version}")
    cfg = TrainConfig(
        data_dir=data_dir,
        out=out or Path("runs") / arch,
        arch=arch,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        learning_rate=learning_rate,
        lr_schedule=lr_schedule,
        patience=patience,
        seed=seed,
        weights=weights,
        target_sensitivity=target_sensitivity,
        name=name,
        version=version,
        time_budget_minutes=time_budget,
        max_train=max_train,
        max_val=max_val,
        precision=precision,
        max_pixels=get_settings().max_pixels,
        augmentation=Augmentation(
            unsharp_prob=processing_augmentation, text_prob=text_augmentation
        ),
    )
    card = train(cfg)
    val = card["metrics"]["val"]
    typer.echo(
        f"wrote {cfg.out}: val AUC {val['auc']:.4f}, threshold {card['threshold']:.4f} "
        f"(sens {val['sensitivity']:.3f}, spec {val['specificity']:.3f}), "
        f"{card['training_seconds']:.0f} s"
    )


@user_errors
def evaluate_command(
    data_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder with test/ (or label folders directly).", exists=True, file_okay=False
        ),
    ],
    model: Annotated[
        Path | None, typer.Option(help="Model folder (default: CXR_MODEL or models/cxr-compact).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: evaluation/<model version> here)."),
    ] = None,
    split: Annotated[str, typer.Option(help="Sub-folder to evaluate if present.")] = "test",
    rethreshold: Annotated[
        bool,
        typer.Option(
            "--rethreshold",
            help="With --split val: choose the card threshold again on these scores with the "
            "current rule and store it, with metrics.val, in the model card.",
        ),
    ] = False,
    shortcut_audit: Annotated[
        bool,
        typer.Option(
            "--shortcut-audit",
            help="Also measure AUC on border-only / lungs-hidden images and draw a Grad-CAM grid.",
        ),
    ] = False,
    robustness: Annotated[
        bool,
        typer.Option(
            "--robustness",
            help="Also score under acquisition shifts (framing, aspect, resolution, JPEG, "
            "noise, rotation, detector sharpening/smoothing) and plot robustness.png.",
        ),
    ] = False,
    use_keras: Annotated[
        bool, typer.Option("--keras", help="Score with model.keras instead of model.tflite.")
    ] = False,
    write_card: Annotated[
        bool,
        typer.Option(
            "--write-card", help="Store the figures as metrics.<split> in the model card."
        ),
    ] = False,
    bootstrap: Annotated[
        int, typer.Option(min=100, help="Bootstrap resamples for the AUC interval.")
    ] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    threshold: Annotated[
        float | None,
        typer.Option(help="Sens/spec at this threshold (default: CXR_THRESHOLD, else the card's)."),
    ] = None,
) -> None:
    """Classification report, AUC with 95% CI, sens/spec at the card threshold, PPV/NPV,
    calibration, ROC/confusion/reliability PNGs and metrics.json."""
    _quiet_tensorflow()
    from training.evaluate import evaluate

    settings = get_settings().with_overrides(model=model, threshold=threshold)
    model_dir = settings.model
    # Not inside the model folder: its evaluation/ is the shipped model's evidence.
    out_dir = out or Path("evaluation") / read_card(model_dir).model_version
    metrics = evaluate(
        data_dir,
        model_dir,
        out_dir,
        split=split,
        shortcut_audit=shortcut_audit,
        robustness=robustness,
        use_keras=use_keras,
        write_card=write_card,
        rethreshold=rethreshold,
        threshold=settings.threshold,
        n_bootstrap=bootstrap,
        seed=seed,
        max_pixels=settings.max_pixels,
    )
    typer.echo(metrics["text"])
    typer.echo(f"wrote {out_dir}", err=True)


@user_errors
def predict_command(
    paths: Annotated[
        list[str], typer.Argument(help="Image files or folders (walked recursively).")
    ],
    model: Annotated[
        Path | None, typer.Option(help="Model folder (default: CXR_MODEL or models/cxr-compact).")
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="Write the CSV here instead of stdout.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Override the card threshold.")] = None,
) -> None:
    """One CSV line per image: path,covid_probability,predicted_label,status,reason."""
    from training.predict import predict_to_csv

    settings = get_settings().with_overrides(model=model, threshold=threshold)
    files = existing_paths(paths)
    try:
        n = predict_to_csv(
            files, settings.model, csv, threshold=settings.threshold, max_pixels=settings.max_pixels
        )
    except BrokenPipeError:  # `predict DIR | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(SIGPIPE_EXIT) from None
    if n == 0:  # as `run` says: an export folder that is not mounted looks empty
        typer.echo("warning: no file under the given paths (not mounted?)", err=True)
    if csv is not None:
        typer.echo(f"wrote {n} rows to {csv}", err=True)


@user_errors
def ensemble_command(
    members: Annotated[list[Path], typer.Argument(help="Trained model folders to average.")],
    data_dir: Annotated[Path, typer.Option("--data", help="DATA_DIR with val/ for the threshold.")],
    out: Annotated[Path, typer.Option(help="Folder for the combined model.")],
    version: Annotated[str, typer.Option(help="Version in the model card.")] = "1.0.0",
) -> None:
    """Average trained models into one (keras + tflite + card); threshold re-chosen on val."""
    _quiet_tensorflow()
    from training.ensemble import build_ensemble

    if members:
        check_model_version(f"{read_card(members[0]).name}-{version}")
    card = build_ensemble(
        members, data_dir, out, version=version, max_pixels=get_settings().max_pixels
    )
    val = card["metrics"]["val"]
    typer.echo(
        f"wrote {out}: val AUC {val['auc']:.4f}, threshold {card['threshold']:.4f} "
        f"(sens {val['sensitivity']:.3f}, spec {val['specificity']:.3f})"
    )


app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("predict")(predict_command)
app.command("ensemble")(ensemble_command)

if __name__ == "__main__":
    app()
