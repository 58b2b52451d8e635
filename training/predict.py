"""``cxr-screen predict``: P(covid) for image files with the shipped LiteRT model.

No TensorFlow. One CSV row per file: ``path,covid_probability,predicted_label,status,
reason``. Folders are walked recursively (hidden files and the output CSV skipped; every
other file is tried, since DICOM files often have no suffix). A file that cannot be read
or that the DICOM gate refuses gets ``status=rejected`` and the reason; it never stops
the run.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from config.settings import DEFAULT_MAX_PIXELS
from training import CLASS_NAMES
from training.data import is_image_file, load_or_reason, walk_files
from worker.csv_rows import write_csv_row
from worker.errors import UserError
from worker.imaging.enum import Status
from worker.model import Classifier

COLUMNS = ("path", "covid_probability", "predicted_label", "status", "reason")
BATCH = 16


@dataclass(frozen=True)
class Prediction:
    path: Path
    covid_probability: float | None
    predicted_label: str
    status: str
    reason: str

    def row(self) -> list[str]:
        prob = "" if self.covid_probability is None else f"{self.covid_probability:.6f}"
        return [str(self.path), prob, self.predicted_label, self.status, self.reason]


def expand(paths: Iterable[Path], output: Path | None = None) -> Iterator[Path]:
    """Files as given, folders walked recursively in sorted order, linked folders included
    (broken symbolic links included, so they get a row rather than vanishing). A walk
    leaves out ``output``, the CSV being written, which may sit in a walked folder."""
    skip = None if output is None else Path(output).resolve()
    seen: set[tuple[str, str]] = set()  # a file given twice, or alone and in its folder
    for path in paths:
        path = Path(path)
        found = walk_files(path) if path.is_dir() else [path]
        for file in found:
            key = _file_key(file)
            if key not in seen and (skip is None or not _is(file, skip)):
                seen.add(key)
                yield file


def _file_key(path: Path) -> tuple[str, str]:
    """The file whatever the spelling of its folder (``a/../a``, absolute, a linked
    folder); linked files keep a row each, as a linked film in an export does."""
    return os.path.realpath(path.parent), path.name


def _is(path: Path, resolved: Path) -> bool:
    try:
        return Path(os.path.realpath(path)) == resolved  # Path.resolve raises on a link loop
    except OSError:  # longer than PATH_MAX: not the file being written
        return False


def rejected_file(path: Path, reason: str) -> Prediction:
    return Prediction(path, None, "", Status.REJECTED.value, reason)


def screened_file(path: Path, prob: float, threshold: float) -> Prediction:
    label = CLASS_NAMES[1] if prob >= threshold else CLASS_NAMES[0]
    return Prediction(path, prob, label, Status.SCREENED.value, "")


def predict_paths(
    paths: Iterable[Path],
    model_dir: Path,
    threshold: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    output: Path | None = None,
) -> Iterator[Prediction]:
    """Predictions in input order, scored in batches of ``BATCH``, for the files of
    ``expand(paths, output)``. The model is loaded now, so that a bad model folder fails
    before any output."""
    classifier = Classifier(Path(model_dir), threshold=threshold)
    return _predictions(expand(paths, output), classifier, max_pixels)


def _predictions(
    files: Iterable[Path], classifier: Classifier, max_pixels: int
) -> Iterator[Prediction]:
    size = classifier.input_size
    pending: list[tuple[Path, np.ndarray | None, str]] = []

    def flush() -> Iterator[Prediction]:
        ready = [x for _, x, _ in pending if x is not None]
        probs = iter(classifier.predict(np.stack(ready)) if ready else [])
        for path, x, reason in pending:
            if x is None:
                yield rejected_file(path, reason)
            else:
                yield screened_file(path, float(next(probs)), classifier.threshold)
        pending.clear()

    for path in files:
        pending.append((path, *load_or_reason(path, size, max_pixels)))
        if len(pending) >= BATCH:
            yield from flush()
    yield from flush()


def write_csv(predictions: Iterable[Prediction], stream: TextIO) -> int:
    write_csv_row(stream, COLUMNS)
    n = 0
    for pred in predictions:
        write_csv_row(stream, pred.row())
        stream.flush()
        n += 1
    return n


def predict_to_csv(
    paths: Iterable[Path],
    model_dir: Path,
    csv_out: Path | None = None,
    threshold: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> int:
    if csv_out is not None:
        check_csv_target(Path(csv_out))
    predictions = predict_paths(paths, model_dir, threshold, max_pixels, csv_out)
    if csv_out is None:
        if isinstance(sys.stdout, io.TextIOWrapper):  # the same escaping as in a file
            sys.stdout.reconfigure(errors="backslashreplace")
        return write_csv(predictions, sys.stdout)
    # Rows go out as they are scored; backslashreplace writes a file name that is not
    # UTF-8 as escapes, so one such name cannot stop the run and the CSV stays UTF-8.
    with Path(csv_out).open("w", newline="", encoding="utf-8", errors="backslashreplace") as out:
        return write_csv(predictions, out)


def check_csv_target(csv_out: Path) -> None:
    """Refuse to write the CSV over a radiograph (``--csv scans/*.png`` replaced the
    first film with the CSV of the others) or into a folder that is not there (a typo
    made it, as `report --out` does not)."""
    if not csv_out.parent.is_dir():
        raise UserError(f"no such folder for --csv: {csv_out.parent}")
    if csv_out.is_file() and is_image_file(csv_out):
        raise UserError(
            f"--csv {csv_out} is an image or DICOM file: refusing to write over it "
            "(name a .csv file; a wildcard after --csv takes its first match)"
        )
