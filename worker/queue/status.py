"""``cxr-screen status`` and ``requeue``: the queue as the database and the broker see it,
and studies sent again."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import Study, utcnow
from db.repository import (
    FINAL_STATUSES,
    fail_unfinished,
    failed_studies,
    lost_to_other_models,
    oldest_queued_at,
    queue_studies,
    stale_studies,
    study_status_counts,
)
from db.session import safe_url
from worker.errors import UserError
from worker.model import read_card
from worker.queue.errors import IngestError, MalformedTask
from worker.queue.messages import Send, StudyTask, message_paths, parse_message, root_name

log = logging.getLogger(__name__)


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


def check_broker(broker_url: str) -> None:
    """The broker answers, or UserError. Ingest checks first: rows marked ``queued``
    (with ``--force``, over a final result) and no message would hide the studies until a
    requeue."""
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except (redis.exceptions.RedisError, ValueError) as exc:  # ValueError: a URL redis-py refuses
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
