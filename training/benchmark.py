"""Inference cost of a model folder with LiteRT: ``python -m training.benchmark [MODEL_DIR]``.

Pins the process to one CPU core (the least busy of those it may use, sampled for half a
second) and one interpreter thread, runs batches of 16 random inputs and prints
milliseconds per image: the median of the repeats with their range, and the load on that
core meanwhile. Preprocessing (decode, ``model_input``) is not included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

STAT = Path("/proc/stat")


@dataclass(frozen=True)
class Timing:
    core: int
    median_ms: float
    fastest_ms: float
    slowest_ms: float
    others_share: float  # of the core's time, taken by other processes during the repeats


def core_busy_times() -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks of each core since boot, from /proc/stat."""
    times = {}
    for line in STAT.read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(f) for f in fields]
            idle = ticks[3] + ticks[4]  # idle + iowait
            times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def busy_share(before: dict[int, tuple[int, int]], core: int, own_s: float = 0.0) -> float:
    """The share of ``core``'s time since ``before`` that was busy, less ``own_s`` seconds
    of this process's own CPU time."""
    after = core_busy_times()
    busy, total = (after[core][i] - before[core][i] for i in (0, 1))
    ticks = os.sysconf("SC_CLK_TCK")
    return max(0.0, busy / ticks - own_s) / (total / ticks) if total else 0.0


def idlest_core(allowed: set[int], sample_s: float = 0.5) -> int:
    before = core_busy_times()
    time.sleep(sample_s)
    return min(sorted(allowed), key=lambda core: busy_share(before, core))


def benchmark(model_dir: Path, batch: int = 16, repeats: int = 30) -> Timing:
    core = idlest_core(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    from worker.model import Classifier

    clf = Classifier(model_dir, threads=1)
    s = clf.input_size
    x = np.random.default_rng(0).random((batch, s, s, 1), np.float32)
    for _ in range(3):
        clf.predict(x)
    before, own = core_busy_times(), time.process_time()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        clf.predict(x)
        times.append((time.perf_counter() - t) / batch * 1000)
    others = busy_share(before, core, time.process_time() - own)
    return Timing(core, statistics.median(times), min(times), max(times), others)


def main(argv: Sequence[str] | None = None) -> None:
    """Errors a person can act on (no model, a bad setting) are one line and exit 2."""
    from pydantic import ValidationError

    from config.settings import SettingsError, get_settings, setting_errors
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
        timing = benchmark(args.model_dir, args.batch, args.repeats)
    except (ModelError, SettingsError) as exc:
        _fail(str(exc))
    except ValidationError as exc:
        _fail(setting_errors(exc))
    print(
        f"{args.model_dir}: {timing.median_ms:.2f} ms per image at batch {args.batch}, "
        f"1 core, 1 thread (median of {args.repeats}: {timing.fastest_ms:.2f}-"
        f"{timing.slowest_ms:.2f} ms; core {timing.core}, {timing.others_share:.0%} of it "
        "taken by other processes meanwhile)"
    )


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
