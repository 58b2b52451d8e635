"""The worker side: screening one queued study (or a batch) and recording its outcome.

Delivery is at-least-once (late acks, redelivery); results are exactly-once because
every write is an upsert on the tables' unique keys. Transient failures are retried
with backoff; anything about the input itself is a rejection.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.repository import (
    Take,
    fail_unfinished,
    files_without_rows,
    mark_failed,
    mark_processing_many,
    save_study,
)
from db.session import DatabaseError, autocommit
from worker.logs import describe_error
from worker.metrics import metrics
from worker.model import Classifier
from worker.queue.errors import IngestRootUnavailable
from worker.queue.messages import Send, StudyBatch, StudyTask, named_studies, worker_files
from worker.screening import StudyOutcome, failed_outcome, screen_study

log = logging.getLogger(__name__)


BACKOFF_BASE = 2.0  # seconds; the n-th retry waits about BASE * 2**n (with jitter)
BACKOFF_MAX = 300.0

# Failures worth another try: the database or broker unreachable, a timeout, a mount
# that is (temporarily) gone. Everything about the input itself is a rejection instead.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    DatabaseError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    TimeoutError,
    ConnectionError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (*TRANSIENT_ERRORS, IngestRootUnavailable))


def backoff(retries: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    Capped well below the visibility timeout: a retry waits in the worker as an
    unacknowledged ETA message, which Redis would otherwise hand out a second time.
    """
    cap = min(BACKOFF_MAX, max(1.0, settings.visibility_timeout / 2))
    ceiling = min(cap, BACKOFF_BASE * 2**retries)
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def delivery_limit(settings: Settings) -> int:
    """Deliveries of one study before it is declared a poison message (``failed``).

    Transient retries use up to ``task_max_retries + 1`` deliveries; two more allow for
    a worker killed or restarted under the study.
    """
    return settings.task_max_retries + 3


def check_ingest_root(settings: Settings) -> None:
    """An empty root is the mount point of a share not mounted: every study's files
    were missing, and each was rejected for good instead of waiting for the mount."""
    root = settings.ingest_root
    if root is not None and not _holds_anything(Path(root)):
        raise IngestRootUnavailable(
            f"ingest root {root} is not mounted on this worker (missing or empty)"
        )


def _holds_anything(folder: Path) -> bool:
    """One directory read, not a listing: it runs for every message, and Path.iterdir
    lists the whole root (thousands of study folders, over NFS)."""
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:  # missing, or not a folder
        return False


def process_study(
    task: StudyTask,
    *,
    settings: Settings,
    classifier: Classifier,
    sessions: sessionmaker[Session],
    deadline: float | None = None,
) -> str:
    """Screen one queued study and write its rows in one transaction; returns the status.

    Raises on transient failures (the task retries) and past ``deadline`` (the soft
    time limit, a ``time.monotonic()``); bad input is never an exception.
    """
    uid, version = task.study_instance_uid, classifier.model_version
    warn_if_other_model(task, version)
    check_ingest_root(settings)
    files = worker_files(task, settings.ingest_root)
    with autocommit(sessions) as session:
        taken = take_studies(session, {task: sorted(files.values())}, version)
    attempts = taken.get(uid)
    if attempts is None:
        skip_finished(task, version, sessions)
        return "skipped"
    if attempts > delivery_limit(settings):
        reason = (
            f"gave up after {attempts - 1} deliveries: the worker was lost, timed out or could "
            "not save the result each time (a file that crashes or hangs the decoder?)"
        )
        save_failure(sessions, task, files, version, reason, settings)
        log.error("study %s: %s", uid, reason)
        return "failed"
    (outcome,) = screen_and_save({task: files}, settings, classifier, sessions, deadline)
    return outcome.status.value


def process_batch(
    batch: StudyBatch,
    *,
    settings: Settings,
    classifier: Classifier,
    sessions: sessionmaker[Session],
    send: Send,
    deadline: float | None = None,
) -> str:
    """Screen the studies of one message: one marker statement, one results transaction.

    A batch delivered before (a study in it crashed, hung or hit a transient error) is
    split into single-study messages instead, so each study gets its own delivery
    count and time limit and one bad study holds back no other.
    """
    version = classifier.model_version
    warn_if_other_model(batch.studies[0], version)
    check_ingest_root(settings)
    files = {t: worker_files(t, settings.ingest_root) for t in batch.studies}
    with autocommit(sessions) as session:
        attempts = take_studies(
            session, {t: sorted(names.values()) for t, names in files.items()}, version
        )
    todo = {t: paths for t, paths in files.items() if t.study_instance_uid in attempts}
    for task in files:
        if task.study_instance_uid not in attempts:
            skip_finished(task, version, sessions)
    if any(attempts[t.study_instance_uid] > 1 for t in todo):
        split_batch(list(todo), send)
        return "split"
    finished = len(screen_and_save(todo, settings, classifier, sessions, deadline))
    return f"{finished} {'study' if finished == 1 else 'studies'} finished"


def take_studies(
    session: Session, names: Mapping[StudyTask, Sequence[str]], version: str
) -> dict[str, int]:
    """Mark the tasks' studies ``processing``; the attempt count of each one taken.

    A study with a final result is taken only if it lacks a row for one of the
    message's files (its file was added after an older message was screened), or was
    forced by an ingest since its result.
    """
    markers = {t.study_instance_uid: files for t, files in names.items()}
    forced = next(iter(names)).force
    attempts = mark_processing_many(
        session, markers, version, take=Take.FORCED if forced else Take.UNFINISHED
    )
    finished = {uid: files for uid, files in markers.items() if uid not in attempts}
    lacking = files_without_rows(
        session, {path: None for files in finished.values() for path in files}, version
    )
    grown = {uid for uid, files in finished.items() if lacking.intersection(files)}
    if grown:
        log.info(
            "%d studies screened without files their messages name: screened again", len(grown)
        )
        again = {uid: markers[uid] for uid in sorted(grown)}
        attempts |= mark_processing_many(session, again, version, take=Take.ANY)
    return attempts


def skip_finished(task: StudyTask, version: str, sessions: sessionmaker[Session]) -> None:
    """A study this worker's model has already finished is not screened again; a row
    queued for another model version is failed with the reason (else it waits for ever)."""
    uid = task.study_instance_uid
    log.info("study %s already has a final result for model %s; skipped", uid, version)
    if task.model_version != version:
        with sessions.begin() as session:
            mark_failed(session, uid, task.model_version, mismatch(task, version))


def screen_and_save(
    files: dict[StudyTask, dict[str, str]],
    settings: Settings,
    classifier: Classifier,
    sessions: sessionmaker[Session],
    deadline: float | None = None,
) -> list[StudyOutcome]:
    """Screen each study (its files in message order), then write all their rows in one
    transaction; metrics and logs only once they are committed."""
    outcomes = [
        screen_study(
            task.study_instance_uid,
            list(names),
            classifier,
            max_pixels=settings.max_pixels,
            batch_size=settings.batch_size,
            deadline=deadline,
            names=names,
        )
        for task, names in files.items()
    ]
    with metrics().timing_db_write(), sessions.begin() as session:
        written = [
            save_outcome(session, task, outcome, settings)
            for task, outcome in zip(files, outcomes, strict=True)
        ]
    for outcome, stored in zip(outcomes, written, strict=True):
        if stored:
            report_outcome(outcome)
        else:
            log.info(
                "study %s: a final result stands; this delivery's outcome was not stored",
                outcome.study_instance_uid,
            )
    return outcomes


def split_batch(tasks: Sequence[StudyTask], send: Send) -> None:
    """Send each study of a batch as a message of its own. When the broker refuses one,
    the batch goes back on the queue whole: an exception would make Celery drop it
    (``task_acks_on_failure_or_timeout`` is off), and studies sent twice are harmless."""
    log.warning("a batch of %d studies came back; sending them one per message", len(tasks))
    try:
        for task in tasks:
            send(task.message())
    except Exception as exc:
        raise Reject(f"could not split the batch: {describe_error(exc)}", requeue=True) from exc


def warn_if_other_model(task: StudyTask, version: str) -> None:
    if task.model_version != version:
        # Policy: the worker's model is the one that screens. The results go under the
        # worker's model version; the row the ingest created for the other version is
        # marked failed with the reason, so `status --failed` shows the mismatch.
        log.warning(
            "study %s was queued for model %s; this worker runs %s and screens with it",
            task.study_instance_uid,
            task.model_version,
            version,
        )


def save_outcome(
    session: Session, task: StudyTask, outcome: StudyOutcome, settings: Settings
) -> bool:
    """The study's rows, and the failed row of a mismatched model version; False when a
    final result stood and nothing was written."""
    written = save_study(
        session,
        outcome,
        patient_id_mode=settings.patient_id_mode,
        hash_key=settings.hash_key,
        from_queue=True,
    )
    if task.model_version != outcome.model_version:
        mark_failed(
            session,
            task.study_instance_uid,
            task.model_version,
            mismatch(task, outcome.model_version),
        )
    return written


def save_failure(
    sessions: sessionmaker[Session],
    task: StudyTask,
    files: Mapping[str, str],
    model_version: str,
    reason: str,
    settings: Settings,
) -> None:
    """A study that gave no outcome, saved ``failed`` with one row per file (``files``:
    each path read and the name its row takes, as ``worker_files`` gives them)."""
    outcome = failed_outcome(task.study_instance_uid, list(files), model_version, reason, files)
    with sessions.begin() as session:
        written = save_outcome(session, task, outcome, settings)
    if written:  # a delivery that failed after another one finished the study counts not
        metrics().observe(outcome)


def mismatch(task: StudyTask, version: str) -> str:
    return (
        f"model version mismatch: queued for {task.model_version}, "
        f"screened by a worker running {version} (results stored under {version})"
    )


def report_outcome(outcome: StudyOutcome) -> None:
    metrics().observe(outcome)
    uid = outcome.study_instance_uid
    log.info(
        "study %s %s (%d instances)",
        uid,
        outcome.status.value,
        len(outcome.instances),
        extra={"study_instance_uid": uid, "status": outcome.status.value},
    )


def record_failure(
    sessions: Callable[[], sessionmaker[Session]],
    task: StudyTask,
    model_version: str,
    error: str,
    settings: Settings,
) -> None:
    """Record the study ``failed``. The database may be the thing that is down: that
    error is raised (the caller keeps the message); any other is only logged."""
    uid = task.study_instance_uid
    files = worker_files(task, settings.ingest_root)
    try:
        save_failure(sessions(), task, files, model_version, error, settings)
    except Exception as exc:
        log.error(
            "study %s failed (%s) and could not be recorded: %s", uid, error, describe_error(exc)
        )
        if is_transient(exc):
            raise


def record_refused(
    sessions: Callable[[], sessionmaker[Session]],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    error: str,
    model_version: Callable[[], str],
) -> None:
    """Best effort: the studies a refused message names are marked ``failed`` with the
    reason, instead of staying ``queued`` for ever. ``model_version`` is asked only when
    the message names none: the worker's model may not load (then its studies stayed
    queued, the message dropped). No row is made for a study nobody queued."""
    # The keyword arguments and any positional object: a message may mix them.
    bodies = [kwargs, *(arg for arg in args if isinstance(arg, dict))]
    uids = [uid for body in bodies for uid in named_studies(body)]
    if not uids:
        return
    versions = [body.get("model_version") for body in bodies]
    try:
        version = next((v for v in versions if isinstance(v, str) and v), None) or model_version()
        with sessions().begin() as session:
            fail_unfinished(session, uids, version, f"malformed task message: {error}")
    except Exception as exc:
        log.error(
            "the studies of a malformed task could not be recorded failed: %s", describe_error(exc)
        )
