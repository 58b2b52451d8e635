"""The distributed pipeline without Celery: task messages, ingest, screening one queued
study, status and requeue. ``worker/tasks.py`` wraps ``process_study`` in a thin task.

Delivery is at-least-once (late acks, redelivery); results are exactly-once because
every write is an upsert on the tables' unique keys.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import kombu
import redis
from celery.exceptions import Reject
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import Study, utcnow
from db.repository import (
    FINAL_STATUSES,
    Take,
    fail_unfinished,
    failed_studies,
    files_without_rows,
    final_study_uids,
    lost_to_other_models,
    mark_failed,
    mark_processing_many,
    oldest_queued_at,
    queue_studies,
    save_study,
    save_unidentified_files,
    stale_studies,
    study_status_counts,
)
from db.session import DatabaseError, autocommit, database_files, safe_url
from worker.discovery import StudyFiles, discover, file_name
from worker.errors import UserError
from worker.imaging.dicom import is_dicom_uid
from worker.logs import describe_error
from worker.metrics import metrics
from worker.model import Classifier, read_card
from worker.screening import StudyOutcome, failed_outcome, screen_study

log = logging.getLogger(__name__)

MESSAGE_KEYS = frozenset({"study_instance_uid", "files", "model_version", "force", "root"})
BATCH_KEYS = frozenset({"studies", "model_version", "force", "root"})
BATCH_STUDY_KEYS = frozenset({"study_instance_uid", "files"})
# A small ingest is batched into about this many messages (9 to 16), so that it still
# spreads over every worker process.
MIN_MESSAGES = 16
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

Send = Callable[[dict[str, Any]], None]


class MalformedTask(ValueError):
    """A task message that cannot be a study: logged, acknowledged, never retried."""


class IngestError(UserError, ValueError):
    """A problem with ingest's input a person can act on."""


class IngestRootUnavailable(OSError):
    """The configured ingest root is not mounted here (yet): a transient failure."""


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


# --- messages --------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyTask:
    """What a worker needs to find a study's files; never pixel data."""

    study_instance_uid: str
    files: tuple[str, ...]
    model_version: str
    force: bool = False
    root: str | None = None  # the ingest root as ingest names it; ``files`` are under it

    def message(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "files": list(self.files),
            "model_version": self.model_version,
        }
        if self.force:
            body["force"] = True
        if self.root is not None:
            body["root"] = self.root
        return body


def message_body(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A task's fields: its keyword arguments, or one positional JSON object."""
    if not args:
        return kwargs
    return args[0] if len(args) == 1 and isinstance(args[0], dict) and not kwargs else None


def parse_message(args: Sequence[Any], kwargs: dict[str, Any]) -> StudyTask:
    """Validate a task's arguments (a JSON object of keyword arguments)."""
    body = message_body(args, kwargs)
    if body is None:
        raise MalformedTask(f"expected keyword arguments only, got {len(args)} positional")
    kwargs = body
    unknown = set(kwargs) - MESSAGE_KEYS
    if unknown:
        raise MalformedTask(f"unknown fields {sorted(unknown)}")
    # The reasons name fields and positions, never values: a malformed UID field can
    # hold a patient's name, and export paths often do.
    uid = kwargs.get("study_instance_uid")
    if not is_dicom_uid(uid):
        raise MalformedTask(
            "study_instance_uid is not a DICOM UID (digits and dots, at most 64 characters)"
        )
    files = kwargs.get("files")
    if not isinstance(files, list) or not files:
        raise MalformedTask("files must be a non-empty list of paths")
    for index, path in enumerate(files):
        if not isinstance(path, str) or not path or "\x00" in path:
            raise MalformedTask(f"files[{index}] is not a file path")
        if not Path(path).is_absolute() and ".." in PurePosixPath(path).parts:
            raise MalformedTask(f"path escapes the ingest root (files[{index}])")
    # A file named twice ("a/x.dcm", "a/./x.dcm") would be screened twice, and the two
    # results' clean-ups deleted each other's row.
    files = list(dict.fromkeys(str(PurePosixPath(path)) for path in files))
    version = kwargs.get("model_version")
    if not isinstance(version, str) or not version:
        raise MalformedTask("model_version must be a non-empty string")
    force = kwargs.get("force", False)
    if not isinstance(force, bool):
        raise MalformedTask("force must be true or false")
    root = kwargs.get("root")
    if root is not None and not is_absolute_path(root):
        raise MalformedTask("root must be an absolute path")
    return StudyTask(uid, tuple(files), version, force, root)


def is_absolute_path(value: Any) -> bool:
    return isinstance(value, str) and "\x00" not in value and PurePosixPath(value).is_absolute()


@dataclass(frozen=True)
class StudyBatch:
    """Several studies in one message: the broker and bookkeeping cost is paid once."""

    studies: tuple[StudyTask, ...]

    def message(self) -> dict[str, Any]:
        shared = self.studies[0].message()
        studies = [
            {"study_instance_uid": t.study_instance_uid, "files": list(t.files)}
            for t in self.studies
        ]
        return {"studies": studies, **{k: v for k, v in shared.items() if k in BATCH_KEYS}}


def parse_batch_message(args: Sequence[Any], kwargs: dict[str, Any]) -> StudyBatch:
    """Validate a batch message: ``{studies: [{study_instance_uid, files}], model_version}``."""
    if args:
        raise MalformedTask(f"expected keyword arguments only, got {len(args)} positional")
    unknown = set(kwargs) - BATCH_KEYS
    if unknown:
        raise MalformedTask(f"unknown fields {sorted(unknown)}")
    studies = kwargs.get("studies")
    if not isinstance(studies, list) or not studies:
        raise MalformedTask("studies must be a non-empty list")
    shared: dict[str, Any] = {k: kwargs[k] for k in BATCH_KEYS - {"studies"} if k in kwargs}
    tasks = []
    for index, study in enumerate(studies):
        # Positions and field names, never values: export paths often hold patient names.
        if not isinstance(study, dict):
            raise MalformedTask(f"studies[{index}] must be {{study_instance_uid, files}}")
        unknown = set(study) - BATCH_STUDY_KEYS
        if unknown:
            raise MalformedTask(f"studies[{index}] has unknown fields {sorted(unknown)}")
        try:
            tasks.append(parse_message((), {**study, **shared}))
        except MalformedTask as exc:
            raise MalformedTask(f"studies[{index}]: {exc}") from None
    if len({t.study_instance_uid for t in tasks}) != len(tasks):
        raise MalformedTask("a study appears twice in one message")
    return StudyBatch(tuple(tasks))


def study_messages(tasks: Sequence[StudyTask], per_message: int) -> list[dict[str, Any]]:
    """Messages for ``tasks``: up to ``per_message`` studies each, and fewer in a small
    ingest, ``ceil(n / MIN_MESSAGES)`` each (one per study up to ``MIN_MESSAGES``
    studies, then 9 to 16 messages), so that it still spreads over the workers."""
    size = max(1, min(per_message, math.ceil(len(tasks) / MIN_MESSAGES)))
    chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    return [c[0].message() if len(c) == 1 else StudyBatch(tuple(c)).message() for c in chunks]


def message_paths(files: Iterable[str], ingest_root: Path | None) -> list[str]:
    """Paths as carried in messages: relative to the ingest root when one is set."""
    if ingest_root is None:
        return [file_name(f) for f in files]
    root = Path(file_name(ingest_root))
    out = []
    for path in files:
        try:
            out.append(Path(file_name(path)).relative_to(root).as_posix())
        except ValueError:
            raise IngestError(
                # not the file's own path: export folders are often named after the patient
                f"files to ingest must be under the ingest root {root} (CXR_INGEST_ROOT); "
                "give the export folder under it"
            ) from None
    return out


def worker_paths(files: Iterable[str], ingest_root: Path | None) -> list[str]:
    """The message's paths on this worker (the ingest root may be mounted elsewhere)."""
    if ingest_root is None:
        return [str(Path(f)) for f in files]
    root = Path(file_name(ingest_root))
    return [str(root / f) if not Path(f).is_absolute() else f for f in files]


def root_name(ingest_root: Path | None) -> str | None:
    """The ingest root as messages carry it: the name rows give the files under it."""
    return None if ingest_root is None else file_name(ingest_root)


def worker_files(task: StudyTask, ingest_root: Path | None) -> dict[str, str]:
    """Each of the task's files as this worker reads it, and the name its row takes: the
    path as ingest named it (the message's root and relative path). Rows, keyed by path
    where a file has no readable UID, then do not depend on where a worker mounts the
    export: two workers mounting it differently write one row. A worker with no ingest
    root of its own reads the files under the message's (it read a relative path from
    its current folder: whatever film sat there was stored as the queued study's)."""
    if ingest_root is None and task.root is not None:
        ingest_root = Path(task.root)
    paths = worker_paths(task.files, ingest_root)
    if task.root is None:
        return {path: path for path in paths}
    return {
        path: path if PurePosixPath(name).is_absolute() else str(PurePosixPath(task.root, name))
        for path, name in zip(paths, task.files, strict=True)
    }


# --- ingest ----------------------------------------------------------------------------


@dataclass
class IngestSummary:
    files: int = 0
    studies: int = 0
    queued_studies: int = 0
    queued_files: int = 0
    skipped_studies: int = 0
    rejected_files: int = 0
    uids: list[str] = field(default_factory=list)


@dataclass
class IngestProgress:
    on_file: Callable[[str], None] = lambda path: None
    on_discovered: Callable[[int], None] = lambda n: None
    on_queued: Callable[[str], None] = lambda uid: None


def ingest(
    paths: Sequence[str | Path],
    settings: Settings,
    send: Send,
    *,
    sessions: sessionmaker[Session],
    force: bool = False,
    progress: IngestProgress | None = None,
) -> IngestSummary:
    """Header-only scan, ``queued`` rows, messages of one or a few studies each.

    Safe to repeat: studies with a final result for this model are skipped (unless
    ``force``); a study queued twice is screened twice into the same rows.
    """

    progress = progress or IngestProgress()
    model_version = read_card(settings.model).model_version
    found = discover(paths, progress.on_file, database_files(settings.database_url))
    summary = IngestSummary(files=found.n_files, rejected_files=len(found.rejected))
    summary.studies = len(found.studies)
    progress.on_discovered(len(found.studies))
    for study in found.studies.values():  # IngestError before any row or message
        message_paths(study.files, settings.ingest_root)
    with sessions.begin() as session:
        save_unidentified_files(session, found.rejected, model_version)
        done = set() if force else final_study_uids(session, list(found.studies), model_version)
        grown = keep_new_files(session, {uid: found.studies[uid] for uid in done}, model_version)
        done -= grown
        tasks = [
            _study_task(uid, study, settings, model_version)
            for uid, study in found.studies.items()
            if uid not in done
        ]
        rows = {
            t.study_instance_uid: {
                "study_instance_uid": t.study_instance_uid,
                "accession_number": found.studies[t.study_instance_uid].accession_number,
                "files": sorted(found.studies[t.study_instance_uid].files),
            }
            for t in tasks
        }
        fresh = [row for uid, row in rows.items() if uid not in grown]
        queue_studies(session, fresh, model_version, force=force)
        # a study with files its result has no row for is queued over that result
        queue_studies(session, [rows[uid] for uid in sorted(grown)], model_version, force=True)
    summary.skipped_studies = len(done)
    # Rows first, then messages: a crash in between leaves studies `queued` without a
    # message, and the next ingest (or requeue) sends them.
    tasks = [replace(t, force=force) for t in tasks]
    for message in study_messages(tasks, settings.studies_per_message):
        send(message)
        for study in message.get("studies", [message]):
            summary.queued_studies += 1
            summary.queued_files += len(study["files"])
            summary.uids.append(study["study_instance_uid"])
            progress.on_queued(study["study_instance_uid"])
    return summary


def keep_new_files(
    session: Session, finished: dict[str, StudyFiles], model_version: str
) -> set[str]:
    """The finished studies with files their rows lack (a late film, a new instance at a
    known path, a film unreadable when screened), each cut down to those files: the
    study row sums up the new rows with the earlier ones."""
    lacking = files_without_rows(
        session,
        {path: sop for study in finished.values() for path, sop in study.instances.items()},
        model_version,
    )
    grown = set()
    for uid, study in finished.items():
        # with the files that share an instance with a new one (a copy sent again under
        # another name): screened alone, a copy would take the instance's row from the
        # other file, which would then lack one, and the two be queued in turn for ever
        sops = {study.instances[path] for path in lacking & study.instances.keys()}
        if sops:
            study.instances = {p: sop for p, sop in study.instances.items() if sop in sops}
            grown.add(uid)
    return grown


def _study_task(uid: str, study: StudyFiles, settings: Settings, model_version: str) -> StudyTask:
    files = tuple(message_paths(study.files, settings.ingest_root))
    return StudyTask(uid, files, model_version, root=root_name(settings.ingest_root))


# --- the worker side -------------------------------------------------------------------


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
    model_version: str,
) -> None:
    """Best effort: the studies a refused message names are marked ``failed`` with the
    reason, instead of staying ``queued`` for ever. ``model_version``: when the message
    names none. No row is made for a study nobody queued."""
    # The keyword arguments and any positional object: a message may mix them.
    bodies = [kwargs, *(arg for arg in args if isinstance(arg, dict))]
    uids = [uid for body in bodies for uid in named_studies(body)]
    if not uids:
        return
    versions = [body.get("model_version") for body in bodies]
    version = next((v for v in versions if isinstance(v, str) and v), model_version)
    try:
        with sessions().begin() as session:
            fail_unfinished(session, uids, version, f"malformed task message: {error}")
    except Exception as exc:
        log.error(
            "the studies of a malformed task could not be recorded failed: %s", describe_error(exc)
        )


def named_studies(body: dict[str, Any]) -> list[str]:
    """The study UIDs a message names, however malformed (at most the column's size)."""
    studies = body.get("studies", [body])
    entries = studies if isinstance(studies, list) else []
    named = [entry.get("study_instance_uid") for entry in entries if isinstance(entry, dict)]
    return [uid for uid in named if isinstance(uid, str) and 0 < len(uid) <= 64]


# --- status and requeue ----------------------------------------------------------------


@dataclass
class QueueStatus:
    counts: dict[str, int]
    queue_length: int | None
    unacked: int | None
    oldest_queued_at: dt.datetime | None
    broker_error: str | None = None

    @property
    def oldest_queued_age(self) -> dt.timedelta | None:
        if self.oldest_queued_at is None:
            return None
        return dt.datetime.now(dt.UTC) - self.oldest_queued_at


def check_broker_url(broker_url: str) -> None:
    """UserError for a scheme no transport serves (``redsi://``): Celery's KeyError was a
    traceback, after ``ingest`` had marked the studies ``queued``."""
    try:
        kombu.Connection(broker_url).transport  # noqa: B018 - resolves the scheme
    except KeyError as exc:
        raise UserError(f"invalid broker URL {safe_url(broker_url)}: {exc.args[0]}") from None


def check_broker(broker_url: str) -> None:
    """A Redis broker answers, or UserError. Ingest checks first: rows marked ``queued``
    (with ``--force``, over a final result) and no message would hide the studies until a
    requeue. Another broker (``amqp://``, ``sentinel://``...) is left to Celery once its
    scheme is known."""
    check_broker_url(broker_url)
    if not broker_url.startswith(("redis://", "rediss://", "unix://")):
        return
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        raise UserError(f"cannot reach the broker at {safe_url(broker_url)}: {exc}") from exc
    finally:
        client.close()


def broker_queue_length(broker_url: str, queue: str) -> tuple[int, int]:
    """Messages waiting in the Celery queue, and messages delivered but not acknowledged."""
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        # Kombu keeps one list per priority step: "queue" and "queue\x06\x16<n>".
        keys = [queue, *(f"{queue}\x06\x16{n}" for n in range(1, 10))]
        waiting = sum(int(client.llen(key)) for key in keys)
        unacked = int(client.hlen("unacked"))
    finally:
        client.close()
    return waiting, unacked


def queue_status(settings: Settings, sessions: sessionmaker[Session], queue: str) -> QueueStatus:
    with sessions() as session:
        counts = study_status_counts(session)
        oldest = oldest_queued_at(session)
    for status in ("queued", "processing", "screened", "rejected", "failed"):
        counts.setdefault(status, 0)
    try:
        waiting, unacked = broker_queue_length(settings.broker_url, queue)
    except (redis.exceptions.RedisError, ValueError) as exc:  # ValueError: not a Redis URL
        return QueueStatus(counts, None, None, oldest, broker_error=str(exc))
    return QueueStatus(counts, waiting, unacked, oldest)


@dataclass
class Requeued:
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed_other_model: list[str] = field(default_factory=list)


def requeue(
    settings: Settings,
    send: Send,
    *,
    sessions: sessionmaker[Session],
    failed: bool = True,
    stale_after: dt.timedelta | None = None,
) -> Requeued:
    """Send studies of the configured model again: the ``failed`` ones, and those still
    ``queued`` or ``processing`` ``stale_after`` after they were queued or taken (their
    message was lost). A study no message can be made for is skipped with a warning;
    one another model's lost worker left ``processing`` is recorded failed
    (``fail_lost_to_other_models``)."""
    model_version = read_card(settings.model).model_version
    done = Requeued()
    with sessions.begin() as session:
        studies = failed_studies(session, model_version) if failed else []
        if stale_after is not None:
            before = utcnow() - stale_after
            studies += stale_studies(session, model_version, before)
            done.failed_other_model = fail_lost_to_other_models(session, model_version, before)
        chosen = []
        for study in studies:
            task = requeue_task(study, settings.ingest_root, model_version)
            if task is None:
                done.skipped.append(study.study_instance_uid)
            else:
                done.sent.append(study.study_instance_uid)
                chosen.append((study, task))
        for final in (False, True):  # a final study with failed files is queued over its result
            rows = [_queued_row(s) for s, _ in chosen if _is_final(s) is final]
            queue_studies(session, rows, model_version, force=final)
    for _, task in chosen:
        send(task.message())
    return done


def fail_lost_to_other_models(
    session: Session, model_version: str, before: dt.datetime
) -> list[str]:
    """Record ``failed``, with the reason, the rows another model version left
    ``processing`` in studies queued for this one; their UIDs.

    A worker running that model took the study and was lost. No message of its version
    exists, and a message of this one is screened under this version: that row stayed
    ``processing`` for ever. Another version's own stale studies are left to its requeue.
    """
    lost = lost_to_other_models(session, model_version, before)
    failed = []
    for version in sorted({study.model_version for study in lost}):
        uids = [s.study_instance_uid for s in lost if s.model_version == version]
        reason = (
            f"left processing by a lost worker running model {version} in a study queued "
            f"for {model_version}: requeue --failed with model {version} to screen it again"
        )
        recorded = fail_unfinished(session, uids, version, reason)
        for uid in recorded:
            log.warning("study %s: %s", uid, reason)
        failed += recorded
    return failed


def _queued_row(study: Study) -> dict[str, Any]:
    return {"study_instance_uid": study.study_instance_uid, "files": study.files}


def _is_final(study: Study) -> bool:
    return study.status in FINAL_STATUSES


def requeue_task(study: Study, ingest_root: Path | None, model_version: str) -> StudyTask | None:
    """The message for a study recorded by ingest, or None (with a warning)."""
    uid = study.study_instance_uid
    try:
        paths = message_paths(study.files or [], ingest_root)
        task = StudyTask(uid, tuple(paths), model_version, root=root_name(ingest_root))
        return parse_message((), task.message())
    except IngestError:
        log.warning("study %s not requeued: its files are not under the ingest root", uid)
    except MalformedTask as exc:
        log.warning("study %s not requeued: %s", uid, exc)
    return None
