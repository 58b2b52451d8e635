"""``cxr-screen run``: screen a folder in-process on all cores, no broker needed.

The main process discovers studies and is the only writer to the database (SQLite
allows one writer); a process pool screens one study per task with the same function
the Celery worker uses.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.queues import SimpleQueue
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.repository import save_study, save_unidentified_files
from db.session import DatabaseError, database_files, is_database_unavailable, open_database
from worker.discovery import discover
from worker.imaging.enum import Label, StudyStatus
from worker.logs import describe_error
from worker.model import Classifier, read_card
from worker.screening import StudyOutcome, failed_outcome, screen_study

CRASHED = (
    "the process screening this study died, also when it screened this study alone "
    "(a decoder crash, or out of memory?)"
)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h
SAVE_RETRY_WAITS = (1.0, 2.0, 4.0, 8.0, 16.0)

_classifier: Classifier | None = None
_max_pixels = 0
_batch_size = 16
_started: SimpleQueue[str] | None = None

# model folder, threshold, max pixels, batch size
PoolArgs = tuple[str, float, int, int]


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


@dataclass
class Results:
    """Where finished studies go: the database (the main process is its only writer),
    the summary and the progress hooks."""

    sessions: sessionmaker[Session]
    settings: Settings
    model_version: str
    summary: RunSummary
    progress: Progress

    def save(self, outcome: StudyOutcome) -> None:
        """One transaction per study; a database that is locked, busy or reconnecting
        is tried again after 1, 2, 4, 8 and 16 s (each SQLite try waits up to 30 s for a
        lock of its own), then the run stops with the error."""
        for wait in (*SAVE_RETRY_WAITS, None):
            try:
                with self.sessions.begin() as session:
                    save_study(
                        session,
                        outcome,
                        patient_id_mode=self.settings.patient_id_mode,
                        hash_key=self.settings.hash_key,
                    )
                break
            except SQLAlchemyError as exc:
                if wait is None or not is_database_unavailable(exc):
                    raise DatabaseError(f"cannot save a result: {describe_error(exc)}") from exc
                log.warning("the database is unavailable (%s); trying again", describe_error(exc))
                time.sleep(wait)
        self.summary.count(outcome)
        self.progress.on_study(outcome)

    def fail(self, study_instance_uid: str, files: list[str], reason: str) -> None:
        self.save(failed_outcome(study_instance_uid, files, self.model_version, reason))


def run(
    paths: Iterable[str | Path], settings: Settings, progress: Progress | None = None
) -> RunSummary:
    progress = progress or Progress()
    start = time.perf_counter()
    card = read_card(settings.model)
    threshold = card.threshold if settings.threshold is None else settings.threshold
    # The whole model, once, before any file is read: one that does not load (a Git LFS
    # pointer, a truncated copy) is one clear error here, not a traceback per pool process.
    Classifier(settings.model, threshold=threshold, threads=1)
    sessions = open_database(settings.database_url)
    found = discover(paths, progress.on_file, database_files(settings.database_url))
    summary = RunSummary(files=found.n_files, rejected_files=len(found.rejected))
    progress.on_discovered(len(found.studies))
    with sessions.begin() as session:
        save_unidentified_files(session, found.rejected, card.model_version)
    results = Results(sessions, settings, card.model_version, summary, progress)
    todo = {uid: sorted(study.files) for uid, study in found.studies.items()}
    pool_args = (str(settings.model), threshold, settings.max_pixels, settings.batch_size)
    _screen_all(todo, settings.workers or usable_cores(), pool_args, results)
    summary.seconds = time.perf_counter() - start
    return summary


def usable_cores() -> int:
    """The cores this process may run on (taskset, a container's cpuset), not the host's."""
    return len(os.sched_getaffinity(0)) or 1


def _screen_all(
    todo: dict[str, list[str]], workers: int, pool_args: PoolArgs, results: Results
) -> None:
    """Screen every study. When a pool process dies (a native decoder crash, the OOM
    killer), the pool is rebuilt; the studies that were being screened then are screened
    again one at a time, each in a process of its own, so the one that kills its process
    is recorded failed and no other study is lost."""
    while todo:
        suspects = _screen_in_pool(todo, min(workers, len(todo)), pool_args, results)
        for uid in sorted(suspects):
            files = todo.pop(uid)
            if _screen_in_pool({uid: files}, 1, pool_args, results):
                results.fail(uid, files, CRASHED)


def _screen_in_pool(
    todo: dict[str, list[str]], workers: int, pool_args: PoolArgs, results: Results
) -> set[str]:
    """Screen ``todo`` on a new pool, removing each study from it once recorded.

    Returns the studies that had started when a pool process died (none if none died).
    """
    context = multiprocessing.get_context("fork")
    started: SimpleQueue[str] = context.SimpleQueue()
    begun: set[str] = set()
    broken = False
    before = len(todo)
    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_load_model,
        initargs=(*pool_args, started, os.getpid()),
    )
    try:
        futures: dict[Future[StudyOutcome], str] = {
            pool.submit(_screen, uid, files): uid for uid, files in todo.items()
        }
        for future in as_completed(futures):
            begun |= _drain(started)  # also keeps the pipe from filling up
            uid = futures.pop(future)  # its outcome is not kept once saved
            try:
                outcome = future.result()
            except BrokenProcessPool:
                broken = True
                continue
            except Exception as exc:
                results.fail(uid, todo.pop(uid), f"unexpected error: {describe_error(exc)}")
                continue
            results.save(outcome)
            del todo[uid]
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    suspects = (begun | _drain(started)) & todo.keys() if broken else set()
    if broken and not suspects and len(todo) == before:
        raise BrokenProcessPool("the screening processes die before screening anything")
    return suspects


def _stop(pool: ProcessPoolExecutor) -> None:
    """Interrupted (Ctrl-C, SIGTERM, the database gone): end the pool processes now.
    Leaving the pool's block would screen every queued study and throw the results away,
    and could hang for good on the pipe of started studies no one reads any more."""
    pool.shutdown(wait=False, cancel_futures=True)
    for child in multiprocessing.active_children():
        child.terminate()


def _drain(started: SimpleQueue[str]) -> set[str]:
    uids = set()
    while not started.empty():
        uids.add(started.get())
    return uids


def _load_model(
    model_dir: str,
    threshold: float,
    max_pixels: int,
    batch_size: int,
    started: SimpleQueue[str],
    parent: int,
) -> None:
    global _classifier, _max_pixels, _batch_size, _started
    _as_pool_process(parent)
    _classifier = Classifier(Path(model_dir), threshold=threshold, threads=1)
    _max_pixels, _batch_size, _started = max_pixels, batch_size, started


def _screen(study_instance_uid: str, files: list[str]) -> StudyOutcome:
    assert _classifier is not None and _started is not None, "pool process without a model"
    # Before the work: if this process dies, the main process knows which study it had.
    _started.put(study_instance_uid)
    return screen_study(
        study_instance_uid, files, _classifier, max_pixels=_max_pixels, batch_size=_batch_size
    )


def _as_pool_process(parent: int) -> None:
    """Ctrl-C is the main process's to handle (it ends the pool); a SIGTERM ends a pool
    process quietly; and a pool process ends when the main process dies (``kill -9``,
    ``KillMode=process``) instead of waiting for work under PID 1 for ever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):  # prctl is Linux's
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)
