"""Thin Celery tasks: validate the message, call ``worker.queue.consume.process_study`` (or
``process_batch``), and turn failures into retries (transient) or a recorded ``failed``
study (final); a batch that fails is split into single-study messages instead.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from config.settings import get_settings
from db.session import is_database_unavailable, open_database
from worker.celery_app import QUEUE, SCREEN_BATCH_TASK, SCREEN_TASK, app, soft_time_limit
from worker.logs import describe_error
from worker.model import Classifier
from worker.queue.consume import (
    backoff,
    is_transient,
    process_batch,
    process_study,
    record_failure,
    record_refused,
    split_batch,
)
from worker.queue.errors import MalformedTask
from worker.queue.messages import StudyTask, parse_batch_message, parse_message

log = logging.getLogger(__name__)

# Per pool process: the model is loaded once (after the fork), the database engine is
# made on first use so that a database that is down at start-up is just a retry.
_classifier: Classifier | None = None
_sessions: sessionmaker[Session] | None = None


def load_worker_state() -> Classifier:
    global _classifier
    if _classifier is None:
        settings = get_settings()
        _classifier = Classifier(settings.model, threshold=settings.threshold, threads=1)
        log.info("pool process loaded model %s", _classifier.model_version)
    return _classifier


def database() -> sessionmaker[Session]:
    global _sessions
    if _sessions is None:
        _sessions = open_database(get_settings().database_url)
    return _sessions


@app.task(bind=True, name=SCREEN_TASK, max_retries=get_settings().task_max_retries)
def screen_study_task(self: Task, *args: Any, **kwargs: Any) -> str:
    """Screen one study. Message: ``{study_instance_uid, files, model_version}``."""
    request_id = self.request.id
    try:
        task = parse_message(args, kwargs)
    except MalformedTask as exc:
        # Retrying cannot fix a message; acknowledge it and keep serving.
        log.error("malformed task %s rejected: %s", request_id, exc)
        refuse(args, kwargs, exc)
        return "malformed"
    settings = get_settings()
    deadline = time.monotonic() + soft_time_limit(settings)
    classifier = model_or_retry(self, task.study_instance_uid)
    try:
        return process_study(
            task, settings=settings, classifier=classifier, sessions=database(), deadline=deadline
        )
    except SoftTimeLimitExceeded:
        reason = f"time limit exceeded ({settings.task_time_limit} s)"
        log.error("study %s: %s", task.study_instance_uid, reason)
        return fail_study(self, task, classifier.model_version, reason)
    except Exception as exc:
        error = describe_error(exc)
        retries = self.request.retries
        if is_transient(exc) and retries < settings.task_max_retries:
            retry_later(self, exc, task.study_instance_uid)
        if is_database_unavailable(exc):
            # Not `failed`: that record could only land once the database is back, in a
            # race with the screening that would then succeed.
            retry_later(self, exc, task.study_instance_uid, past_limit="database still unavailable")
        if is_transient(exc):
            reason = f"gave up after {retries} retries: {error}"
        else:
            # No traceback for a database error: its last line would be the whole message.
            log.error(
                "study %s: unexpected error: %s",
                task.study_instance_uid,
                error,
                exc_info=not isinstance(exc, StatementError),
            )
            reason = f"unexpected error: {error}"
        return fail_study(self, task, classifier.model_version, reason)


@app.task(bind=True, name=SCREEN_BATCH_TASK, max_retries=get_settings().task_max_retries)
def screen_batch_task(self: Task, *args: Any, **kwargs: Any) -> str:
    """Screen several studies.

    Message: ``{studies: [{study_instance_uid, files}], model_version}``.
    """
    try:
        batch = parse_batch_message(args, kwargs)
    except MalformedTask as exc:
        log.error("malformed task %s rejected: %s", self.request.id, exc)
        refuse(args, kwargs, exc)
        return "malformed"
    settings = get_settings()
    deadline = time.monotonic() + soft_time_limit(settings)
    classifier = model_or_retry(self, f"batch of {len(batch.studies)} studies")
    try:
        return process_batch(
            batch,
            settings=settings,
            classifier=classifier,
            sessions=database(),
            send=enqueue,
            deadline=deadline,
        )
    except Exception as exc:
        label = f"batch of {len(batch.studies)} studies"
        if is_transient(exc) and self.request.retries < settings.task_max_retries:
            retry_later(self, exc, label)
        # A time limit, an unexpected error, retries used up: each study goes on alone
        # and meets its own fate, without the others.
        log.warning("%s: %s", label, describe_error(exc))
        split_batch(batch.studies, enqueue)
        return "split"


def model_or_retry(task: Task, label: str) -> Classifier:
    """The model, or the message back on the queue after the backoff: a task that raised
    here was dropped by Celery (no acknowledgement on failure) with its study ``queued``.
    The worker checks the model at start; this is a model folder changed under it."""
    try:
        return load_worker_state()
    except Exception as exc:
        log.error("%s: the model cannot be loaded: %s", label, describe_error(exc))
        retry_later(task, exc, label, past_limit="the model cannot be loaded")


def fail_study(task: Task, study: StudyTask, model_version: str, reason: str) -> str:
    """Record the study ``failed``. While the database cannot record that either, the
    message is not acknowledged with no result (the study would stay ``queued`` with no
    message left): it is retried after the backoff until the database is back."""
    try:
        record_failure(database, study, model_version, reason, get_settings())
    except Exception as exc:
        retry_later(
            task,
            exc,
            study.study_instance_uid,
            past_limit="failed, and the failure cannot be recorded",
        )
    return "failed"


def refuse(args: Any, kwargs: dict[str, Any], error: MalformedTask) -> None:
    record_refused(database, args, kwargs, str(error), lambda: load_worker_state().model_version)


def retry_later(
    task: Task, exc: Exception, label: str, *, past_limit: str | None = None
) -> NoReturn:
    """Raise Celery's retry for a transient failure, after an exponential backoff.

    ``past_limit``: why the study is retried past the retry limit (the database is
    still down, or the study failed for good but that could not be recorded). A Reject
    with requeue would hand the message straight back with nothing to space the
    deliveries (the test saw 996 in 20 s of database outage).
    """
    settings = get_settings()
    retries = task.request.retries
    countdown = backoff(retries, settings)
    if past_limit:
        log.warning(
            "%s: %s (%s); trying again in %.1f s", label, past_limit, describe_error(exc), countdown
        )
    else:
        log.warning(
            "%s: transient failure (%s); retry %d of %d in %.1f s",
            label,
            describe_error(exc),
            retries + 1,
            settings.task_max_retries,
            countdown,
        )
    try:
        retry = task.retry(
            countdown=countdown,
            exc=exc,
            throw=False,
            max_retries=retries + 1 if past_limit else None,
            argsrepr="()",  # Celery would put repr(kwargs), the file paths, in the headers
            kwargsrepr=message_summary(task.request.kwargs or {}),
        )
    except Reject:
        # The retry could not be published (broker down too): put the message back
        # instead of dropping it.
        raise Reject(exc, requeue=True) from exc
    raise retry from exc


def enqueue(message: dict[str, Any]) -> None:
    """Publish one message (JSON), retrying while the broker is unreachable.

    Without time limits: Celery would put the publisher's (``ingest``'s) in the message,
    and they would override the worker's own ``CXR_TASK_TIME_LIMIT``.
    """
    task = screen_batch_task if "studies" in message else screen_study_task
    task.apply_async(
        kwargs=message,
        queue=QUEUE,
        time_limit=None,
        soft_time_limit=None,
        argsrepr="()",
        kwargsrepr=message_summary(message),
    )


def message_summary(message: dict[str, Any]) -> str:
    """What Flower and ``celery inspect`` show of a message: UIDs and counts, never the
    file paths (export folders are often named after the patient)."""
    if "studies" in message:
        return f"<batch of {len(message['studies'])} studies>"
    return f"<study {message.get('study_instance_uid')}, {len(message.get('files', []))} files>"
