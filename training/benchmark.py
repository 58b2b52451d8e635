"""Inference cost of a model folder with LiteRT: ``python -m training.benchmark [MODEL_DIR]``.

Pins the process to one CPU core (``os.sched_setaffinity``) and one interpreter thread,
runs batches of 16 random inputs and prints milliseconds per image (median of repeats).
Preprocessing (decode, ``model_input``) is not included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np


def benchmark(model_dir: Path, batch: int = 16, repeats: int = 30, core: int = 0) -> float:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    from worker.model import Classifier

    clf = Classifier(model_dir, threads=1)
    s = clf.input_size
    x = np.random.default_rng(0).random((batch, s, s, 1), np.float32)
    for _ in range(3):
        clf.predict(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        clf.predict(x)
        times.append((time.perf_counter() - t) / batch * 1000)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    """Errors a person can act on (no model, a bad setting) are one line and exit 2."""
    from pydantic import ValidationError

    from config.settings import SettingsError, get_settings
    from worker.cli_common import setting_errors
    from worker.model import ModelError

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "model_dir",
        nargs="?",
        type=Path,
        help="model folder (default: the configured model, CXR_MODEL or the shipped one)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        if args.model_dir is None:  # CXR_MODEL (or the settings file), as the CLI reads it
            args.model_dir = get_settings().model
        ms = benchmark(args.model_dir, args.batch, args.repeats)
    except (ModelError, SettingsError) as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(setting_errors(exc))
    print(f"{args.model_dir}: {ms:.2f} ms per image at batch {args.batch}, 1 core, 1 thread")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
