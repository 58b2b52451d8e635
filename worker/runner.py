"""``cxr-screen run``: screen a folder in-process on all cores, no broker needed.

The main process discovers studies and is the only writer to the database (SQLite
allows one writer); a process pool screens one study per task with the same function
the Celery worker uses.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from db.repository import save_instances, save_study
from db.session import open_database
from worker.discovery import discover
from worker.imaging.enum import Label, StudyStatus
from worker.model import Classifier, read_card
from worker.screening import StudyOutcome, screen_study

_classifier: Classifier | None = None
_max_pixels = 0
_batch_size = 16


@dataclass
class RunSummary:
    files: int = 0
    studies: int = 0
    screened: int = 0
    rejected: int = 0
    failed: int = 0
    positives: int = 0
    rejected_files: int = 0
    seconds: float = 0.0

    def count(self, outcome: StudyOutcome) -> None:
        self.studies += 1
        if outcome.status is StudyStatus.SCREENED:
            self.screened += 1
        elif outcome.status is StudyStatus.FAILED:
            self.failed += 1
        else:
            self.rejected += 1
        self.positives += outcome.predicted_label is Label.COVID


@dataclass
class Progress:
    """Callbacks a front end (the CLI's progress bars) can hook into."""

    on_discovered: Callable[[int], None] = lambda n: None
    on_file: Callable[[str], None] = lambda path: None
    on_study: Callable[[StudyOutcome], None] = lambda outcome: None


def run(
    paths: Iterable[str | Path], settings: Settings, progress: Progress | None = None
) -> RunSummary:
    progress = progress or Progress()
    start = time.perf_counter()
    card = read_card(settings.model)
    threshold = card.threshold if settings.threshold is None else settings.threshold
    sessions = open_database(settings.database_url)
    found = discover(paths, on_file=progress.on_file)
    summary = RunSummary(files=found.n_files, rejected_files=len(found.rejected))
    progress.on_discovered(len(found.studies))
    with sessions.begin() as session:
        save_instances(session, found.rejected, card.model_version, None)
    workers = max(1, min(settings.workers or os.cpu_count() or 1, len(found.studies)))
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_load_model,
        initargs=(str(settings.model), threshold, settings.max_pixels, settings.batch_size),
    ) as pool:
        futures: dict[Future[StudyOutcome], str] = {
            pool.submit(_screen, uid, study.files): uid for uid, study in found.studies.items()
        }
        for future in as_completed(futures):
            outcome = future.result()
            with sessions.begin() as session:
                save_study(
                    session,
                    outcome,
                    patient_id_mode=settings.patient_id_mode,
                    hash_key=settings.hash_key,
                )
            summary.count(outcome)
            progress.on_study(outcome)
    summary.seconds = time.perf_counter() - start
    return summary


def _load_model(model_dir: str, threshold: float, max_pixels: int, batch_size: int) -> None:
    global _classifier, _max_pixels, _batch_size
    _classifier = Classifier(Path(model_dir), threshold=threshold, threads=1)
    _max_pixels, _batch_size = max_pixels, batch_size


def _screen(study_instance_uid: str, files: list[str]) -> StudyOutcome:
    assert _classifier is not None, "worker process started without a model"
    return screen_study(
        study_instance_uid, files, _classifier, max_pixels=_max_pixels, batch_size=_batch_size
    )
