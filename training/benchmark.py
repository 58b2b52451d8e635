"""Inference cost of a model folder with LiteRT: ``python -m training.benchmark [MODEL_DIR]``.

Pins the process to one CPU core (``os.sched_setaffinity``) and one interpreter thread,
runs batches of 16 random inputs and prints milliseconds per image (median of repeats).
Preprocessing (decode, ``model_input``) is not included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

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


def main() -> None:
    from config.settings import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    ms = benchmark(args.model_dir, args.batch, args.repeats)
    print(f"{args.model_dir}: {ms:.2f} ms per image at batch {args.batch}, 1 core, 1 thread")


if __name__ == "__main__":
    main()
