"""The distributed pipeline's logic (messages, ingest, one queued study, requeue) and
the end-to-end equivalence of ``ingest`` + ``worker`` with ``run``.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.exceptions import Reject
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.session import DatabaseError, is_database_unavailable, open_database
from tests.conftest import REDIS_URL
from tests.dicom_factory import base_dataset, png_pixels, write
from tests.sql import rows
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import all_final, ingest, worker_env
from tests.worker.test_run import predictions
from worker.celery_app import celery_config
from worker.model import Classifier, read_card
from worker.queue.consume import (
    backoff,
    mismatch,
    process_batch,
    process_study,
    record_failure,
    save_failure,
    split_batch,
)
from worker.queue.errors import IngestError, IngestRootUnavailable, MalformedTask
from worker.queue.ingest import IngestSummary
from worker.queue.ingest import ingest as ingest_studies
from worker.queue.messages import (
    MIN_MESSAGES,
    StudyBatch,
    StudyTask,
    message_paths,
    parse_batch_message,
    parse_message,
    study_messages,
    worker_files,
    worker_paths,
)
from worker.queue.status import requeue
from worker.runner import run

GOOD = {"study_instance_uid": "1.2.3.4", "files": ["a/b.dcm"], "model_version": "m-1"}


def test_celery_is_configured_for_at_least_once_delivery() -> None:
    conf = celery_config(Settings(visibility_timeout=1234, task_time_limit=100))
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 1234
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_time_limit"] == 100 and conf["task_soft_time_limit"] == 90
    assert conf["task_ignore_result"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"study_instance_uid": "x; DROP"}, "not a DICOM UID"),
        # The reason names the field, not its value: a misfiled patient name, say.
        ({"study_instance_uid": "DOE^JANE"}, r"^study_instance_uid is not a DICOM UID \(digits"),
        ({"study_instance_uid": "1.2.3\n"}, "not a DICOM UID"),
        ({"study_instance_uid": "1." * 32 + "1"}, "not a DICOM UID"),
        ({"files": []}, "non-empty list"),
        ({"files": ["a.dcm", "../Doe^Jane/x.dcm"]}, r"escapes the ingest root \(files\[1\]\)$"),
        ({"files": ["a.dcm", ""]}, r"^files\[1\] is not a file path$"),
        ({"model_version": 3}, "model_version"),
        ({"force": "yes"}, "force"),
        ({"root": "exports"}, "root must be an absolute path"),
        ({"root": ["/exports"]}, "root must be an absolute path"),
        ({"pixels": "..."}, "unknown fields"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedTask, match=message):
        parse_message((), {**GOOD, **change})


def test_an_ingest_root_and_files_spelled_with_dot_dot_still_match() -> None:
    """Discovery names files without `..`; a root given with one matched none of them."""
    assert message_paths(["/x/export/../export/a/1.dcm"], Path("/x/tmp/../export")) == ["a/1.dcm"]


def test_a_worker_without_an_ingest_root_reads_under_the_messages_root() -> None:
    """It read the relative path from its current folder: whatever film sat there was
    stored as the queued study's result."""
    task = StudyTask("1.2.3.4", ("cxr/1.dcm",), "m-1", False, "/exports")
    assert worker_files(task, None) == {"/exports/cxr/1.dcm": "/exports/cxr/1.dcm"}
    assert worker_files(task, Path("/mnt/pacs")) == {"/mnt/pacs/cxr/1.dcm": "/exports/cxr/1.dcm"}


def test_an_empty_ingest_root_is_not_mounted_yet(
    tmp_path: Path, sqlite_url: str, model_dir: Path
) -> None:
    """The mount point of a share not mounted is an empty folder: every study's files
    were missing, and each study was rejected for good instead of retried."""
    mount = tmp_path / "pacs"
    mount.mkdir()
    settings = Settings(database_url=sqlite_url, model=model_dir, ingest_root=mount)
    task = StudyTask("1.2.3.4", ("cxr/1.dcm",), read_card(model_dir).model_version)
    with pytest.raises(IngestRootUnavailable, match="not mounted on this worker"):
        process_study(
            task,
            settings=settings,
            classifier=Classifier(model_dir),
            sessions=open_database(sqlite_url),
        )
    assert rows(sqlite_url, "SELECT count(*) FROM predictions") == [(0,)]


def test_messages_round_trip_and_paths_are_relative_to_the_ingest_root(tmp_path: Path) -> None:
    task = parse_message((), GOOD)
    assert parse_message((), task.message()) == task
    twice = parse_message((), {**GOOD, "files": ["a/b.dcm", "a/./b.dcm", "a//b.dcm", "c.dcm"]})
    assert twice.files == ("a/b.dcm", "c.dcm"), "a file named twice is screened once"
    rooted = parse_message((), {**GOOD, "root": "/exports"})
    assert rooted.root == "/exports" and parse_message((), rooted.message()) == rooted
    batch = StudyBatch((rooted, replace(rooted, study_instance_uid="1.2.3.5")))
    assert parse_batch_message((), batch.message()) == batch
    root = tmp_path / "export"
    assert message_paths([str(root / "s" / "1.dcm")], root) == ["s/1.dcm"]
    assert worker_paths(["s/1.dcm"], Path("/mnt/pacs")) == ["/mnt/pacs/s/1.dcm"]
    with pytest.raises(IngestError, match="must be under the ingest root") as refused:
        message_paths(["/elsewhere/DOE^JOHN/1.dcm"], root)
    assert "DOE^JOHN" not in str(refused.value), "the file's path can name the patient"


BATCH = {
    "studies": [
        {"study_instance_uid": "1.2.3.4", "files": ["a/b.dcm"]},
        {"study_instance_uid": "1.2.3.5", "files": ["a/c.dcm", "a/d.dcm"]},
    ],
    "model_version": "m-1",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"studies": []}, "non-empty list"),
        ({"studies": [{"study_instance_uid": "1.2", "files": ["x"], "pixels": 1}]}, "unknown"),
        ({"studies": ["1.2"]}, r"^studies\[0\] must be"),
        (
            {"studies": [{"study_instance_uid": "1.2", "files": ["x"]}, {"files": ["x"]}]},
            r"^studies\[1\]: study_instance_uid is not a DICOM UID \(digits and dots",
        ),
        ({"studies": [{"study_instance_uid": "1.2", "files": ["x"]}] * 2}, "appears twice"),
        ({"model_version": ""}, "model_version"),
        ({"queue": "other"}, "unknown fields"),
    ],
)
def test_malformed_batch_messages_are_refused_with_a_reason(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(MalformedTask, match=message):
        parse_batch_message((), {**BATCH, **change})


@pytest.mark.parametrize(
    "study",
    [
        "/exports/Doe^Jane/1.dcm",
        {"study_instance_uid": "1.2.3", "files": ["/exports/Doe^Jane/1.dcm"], "series": 1},
    ],
)
def test_a_refused_batch_names_the_study_by_position_not_by_its_paths(study: Any) -> None:
    """The reason is logged and stored in ``studies.reason``."""
    with pytest.raises(MalformedTask) as refused:
        parse_batch_message((), {**BATCH, "studies": [*BATCH["studies"], study]})
    assert str(refused.value).startswith("studies[2] ")
    assert "Doe^Jane" not in str(refused.value)


def test_batch_messages_round_trip() -> None:
    batch = parse_batch_message((), BATCH)
    assert [t.study_instance_uid for t in batch.studies] == ["1.2.3.4", "1.2.3.5"]
    assert batch.studies[1] == StudyTask("1.2.3.5", ("a/c.dcm", "a/d.dcm"), "m-1")
    assert parse_batch_message((), batch.message()) == batch


@pytest.mark.parametrize(
    ("n_studies", "per_message", "expected_sizes"),
    [
        (3, 8, [1, 1, 1]),
        (MIN_MESSAGES, 8, [1] * MIN_MESSAGES),
        (40, 8, [3] * 13 + [1]),
        (160, 8, [8] * 20),
        (1000, 8, [8] * 125),
        (160, 1, [1] * 160),
    ],
)
def test_ingest_batches_a_backlog_but_spreads_a_small_one(
    n_studies: int, per_message: int, expected_sizes: list[int]
) -> None:
    tasks = [StudyTask(f"1.2.{i}", (f"{i}.dcm",), "m-1") for i in range(n_studies)]
    messages = study_messages(tasks, per_message)
    sizes = [len(m["studies"]) if "studies" in m else 1 for m in messages]
    assert sizes == expected_sizes
    sent = [t for m in messages for t in m.get("studies", [m])]
    assert [m["study_instance_uid"] for m in sent] == [t.study_instance_uid for t in tasks]


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    settings = Settings(visibility_timeout=3600)
    rng = random.Random(1)
    waits = [backoff(n, settings, rng) for n in range(12)]
    for n, wait in enumerate(waits[:6]):
        assert 2**n <= wait <= 2 ** (n + 1)
    assert max(waits) <= 300
    assert backoff(20, Settings(visibility_timeout=10), rng) <= 5


@dataclass
class Ingested:
    settings: Settings
    sessions: sessionmaker[Session]
    sent: list[dict[str, Any]]
    summary: IngestSummary


def ingest_in_process(folder: Path, sqlite_url: str, model_dir: Path) -> Ingested:
    """``ingest`` into SQLite, the messages collected in a list instead of sent."""
    settings = Settings(database_url=sqlite_url, model=model_dir)
    sessions = open_database(sqlite_url)
    sent: list[dict[str, Any]] = []
    summary = ingest_studies([folder], settings, sent.append, sessions=sessions)
    return Ingested(settings, sessions, sent, summary)


def test_ingest_and_one_study_in_process(
    tmp_path: Path, sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    done = ingest_in_process(dicom_dir / "cxr", sqlite_url, model_dir)
    settings, sessions, sent = done.settings, done.sessions, done.sent
    summary = done.summary
    assert summary.queued_studies == len(sent) == 3
    assert rows(sqlite_url, "SELECT DISTINCT status FROM studies") == [("queued",)]
    assert {r[0] for r in rows(sqlite_url, "SELECT status FROM predictions")} <= {"rejected"}
    classifier = Classifier(model_dir)
    for message in sent:
        task = parse_message((), message)
        assert process_study(task, settings=settings, classifier=classifier, sessions=sessions) in (
            "screened",
            "rejected",
        )
        # Delivered again: already final, skipped, same rows.
        assert (
            process_study(task, settings=settings, classifier=classifier, sessions=sessions)
            == "skipped"
        )
    again: list[dict[str, Any]] = []
    assert (
        ingest_studies(
            [dicom_dir / "cxr"], settings, again.append, sessions=sessions
        ).skipped_studies
        == 3
    )
    assert again == []
    assert rows(sqlite_url, "SELECT count(*) FROM studies") == [(3,)]
    assert rows(sqlite_url, "SELECT max(attempts) FROM studies") == [(1,)]


def test_a_batch_in_process_and_a_batch_delivered_twice_is_split(
    sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    from db.repository import mark_processing

    done = ingest_in_process(dicom_dir, sqlite_url, model_dir)
    settings, sessions, sent = done.settings, done.sessions, done.sent
    summary = done.summary
    batches = [parse_batch_message((), m) for m in sent if "studies" in m]
    assert len(batches) >= 2 and summary.queued_studies > len(sent)
    classifier = Classifier(model_dir)

    def deliver(batch: Any, resent: list[dict[str, Any]]) -> str:
        return process_batch(
            batch, settings=settings, classifier=classifier, sessions=sessions, send=resent.append
        )

    first, second = batches[0], batches[1]
    resent: list[dict[str, Any]] = []
    assert deliver(first, resent) == f"{len(first.studies)} studies finished" and resent == []
    # delivered again: skipped
    assert deliver(first, resent) == "0 studies finished" and resent == []
    # A study of the second batch was taken before (its worker died): the batch is split
    # into one message per study, and screening those finishes the job.
    victim = second.studies[0]
    with sessions.begin() as session:
        mark_processing(session, victim.study_instance_uid, classifier.model_version, [])
    assert deliver(second, resent) == "split"
    assert [parse_message((), m) for m in resent] == list(second.studies)
    for message in resent:
        task = parse_message((), message)
        process_study(task, settings=settings, classifier=classifier, sessions=sessions)
    uids = [t.study_instance_uid for t in (*first.studies, *second.studies)]
    these = f"FROM studies WHERE study_instance_uid IN ({', '.join(repr(u) for u in uids)})"
    statuses = rows(sqlite_url, f"SELECT status {these}")
    assert len(statuses) == len(uids) and {s for (s,) in statuses} <= {"screened", "rejected"}
    attempts = dict(rows(sqlite_url, f"SELECT study_instance_uid, attempts {these}"))
    assert attempts[victim.study_instance_uid] == 3
    assert {attempts[t.study_instance_uid] for t in second.studies[1:]} == {2}
    assert {attempts[t.study_instance_uid] for t in first.studies} == {1}


def test_a_model_mismatch_screens_with_the_workers_model_and_says_so(
    sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    done = ingest_in_process(dicom_dir / "cxr", sqlite_url, model_dir)
    settings, sessions, sent = done.settings, done.sessions, done.sent
    old = StudyTask(**{**parse_message((), sent[0]).__dict__, "model_version": "old-0.1"})
    classifier = Classifier(model_dir)
    process_study(old, settings=settings, classifier=classifier, sessions=sessions)
    status = dict(
        rows(
            sqlite_url,
            "SELECT model_version, status FROM studies "
            f"WHERE study_instance_uid = '{old.study_instance_uid}'",
        )
    )
    assert status == {"old-0.1": "failed", classifier.model_version: "screened"}


@pytest.mark.parametrize("batched", [False, True])
def test_a_mismatched_study_the_worker_already_screened_is_not_left_queued(
    batched: bool, sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    from db.repository import queue_studies

    done = ingest_in_process(dicom_dir / "cxr", sqlite_url, model_dir)
    settings, sessions = done.settings, done.sessions
    task = parse_message((), done.sent[0])
    classifier = Classifier(model_dir)
    process_study(task, settings=settings, classifier=classifier, sessions=sessions)
    old = StudyTask(**{**task.__dict__, "model_version": "old-0.1"})
    with sessions.begin() as session:
        queue_studies(
            session, [{"study_instance_uid": old.study_instance_uid, "files": old.files}], "old-0.1"
        )
    if batched:
        batch = StudyBatch(studies=(old,))
        assert process_batch(
            batch, settings=settings, classifier=classifier, sessions=sessions, send=print
        ) == ("0 studies finished")
    else:
        assert process_study(old, settings=settings, classifier=classifier, sessions=sessions) == (
            "skipped"
        )
    assert rows(
        sqlite_url, "SELECT status, reason FROM studies WHERE model_version = 'old-0.1'"
    ) == [("failed", mismatch(old, classifier.model_version))]


def test_failed_studies_are_requeued(sqlite_url: str, model_dir: Path, dicom_dir: Path) -> None:
    from db.repository import mark_failed

    done = ingest_in_process(dicom_dir / "cxr", sqlite_url, model_dir)
    settings, sessions, sent = done.settings, done.sessions, done.sent
    uid = sent[0]["study_instance_uid"]
    with sessions.begin() as session:
        mark_failed(session, uid, sent[0]["model_version"], "OperationalError: db down")
    again: list[dict[str, Any]] = []
    assert requeue(settings, again.append, sessions=sessions).sent == [uid]
    assert again[0]["files"] == sent[0]["files"]
    assert rows(sqlite_url, f"SELECT status FROM studies WHERE study_instance_uid = '{uid}'") == [
        ("queued",)
    ]


def test_requeue_stale_fails_a_row_another_models_lost_worker_left_processing(
    sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    """A worker of another model took a study queued for this one and was killed; a worker
    of this model screened it. The other version's row stayed ``processing`` for ever:
    ``requeue --stale`` looked at the configured version only. That version's own
    studies, queued or taken, are left to its own requeue."""
    import datetime as dt

    from db.repository import mark_processing_many, queue_studies

    done = ingest_in_process(dicom_dir / "cxr", sqlite_url, model_dir)
    settings, sessions, sent = done.settings, done.sessions, done.sent
    classifier = Classifier(model_dir)
    uid = sent[0]["study_instance_uid"]
    its_own = {"1.2.3.98": "queued", "1.2.3.99": "processing"}
    with sessions.begin() as session:
        mark_processing_many(session, {uid: sent[0]["files"]}, "other-9.9")
        queue_studies(
            session, [{"study_instance_uid": u, "files": ["x.dcm"]} for u in its_own], "other-9.9"
        )
        mark_processing_many(session, {"1.2.3.99": ["x.dcm"]}, "other-9.9")
    for message in sent:
        task = parse_message((), message)
        process_study(task, settings=settings, classifier=classifier, sessions=sessions)
    again: list[dict[str, Any]] = []
    requeued = requeue(
        settings, again.append, sessions=sessions, failed=False, stale_after=dt.timedelta(0)
    )
    other = (
        "SELECT study_instance_uid, status, reason FROM studies WHERE model_version = 'other-9.9'"
    )
    found = {row[0]: row[1:] for row in rows(sqlite_url, other)}
    assert {u: found[u][0] for u in its_own} == its_own
    status, reason = found[uid]
    assert status == "failed"
    assert "left processing by a lost worker running model other-9.9" in reason
    assert (requeued.sent, requeued.failed_other_model, again) == ([], [uid], [])
    assert requeue(settings, again.append, sessions=sessions).sent == [], (
        "another model's failed study is not sent for this one"
    )


def test_requeue_works_when_workers_mount_the_export_elsewhere_and_skips_what_it_cannot(
    tmp_path: Path,
    sqlite_url: str,
    model_dir: Path,
    dicom_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    export = tmp_path / "ingest-host" / "export"
    shutil.copytree(dicom_dir / "cxr", export / "cxr")
    mount = tmp_path / "worker-host"
    mount.mkdir()
    (mount / "export").symlink_to(export)  # the same export, under another root
    ingest_host = Settings(database_url=sqlite_url, model=model_dir, ingest_root=export)
    worker_host = ingest_host.with_overrides(ingest_root=mount / "export")
    sessions = open_database(sqlite_url)
    sent: list[dict[str, Any]] = []
    ingest_studies([export], ingest_host, sent.append, sessions=sessions)
    classifier = Classifier(model_dir)
    for message in sent:
        task = parse_message((), message)
        process_study(task, settings=worker_host, classifier=classifier, sessions=sessions)
    good, outside, empty = (m["study_instance_uid"] for m in sent)
    unusable = {outside: '["/elsewhere/1.dcm"]', empty: "[]"}
    with sessions.begin() as session:  # later deliveries failed; two rows are unusable
        session.execute(text("UPDATE studies SET status = 'failed'"))
        for uid, files in unusable.items():
            change = text("UPDATE studies SET files = :files WHERE study_instance_uid = :uid")
            session.execute(change, {"files": files, "uid": uid})
    again: list[dict[str, Any]] = []
    done = requeue(ingest_host, again.append, sessions=sessions)
    assert (done.sent, sorted(done.skipped)) == ([good], sorted([outside, empty]))
    assert again == [sent[0]]
    assert f"study {outside} not requeued: its files are not under the ingest root" in caplog.text
    assert f"study {empty} not requeued: files must be a non-empty list" in caplog.text


def test_rows_name_files_as_ingest_did_whatever_the_workers_mount(
    tmp_path: Path, database_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    """Two workers mounting the export under different roots name a file alike, so a
    file that becomes unreadable between two deliveries keeps one row."""
    export = tmp_path / "ingest-host" / "export"
    shutil.copytree(dicom_dir / "cxr", export / "cxr")
    mounts = []
    for host in ("worker-a", "worker-b"):
        (tmp_path / host).mkdir()
        (tmp_path / host / "export").symlink_to(export)
        mounts.append(tmp_path / host / "export")
    ingest_host = Settings(database_url=database_url, model=model_dir, ingest_root=export)
    sessions = open_database(database_url)
    sent: list[dict[str, Any]] = []
    ingest_studies([export], ingest_host, sent.append, sessions=sessions)
    classifier = Classifier(model_dir)
    task = parse_message((), sent[0])
    first = ingest_host.with_overrides(ingest_root=mounts[0])
    process_study(task, settings=first, classifier=classifier, sessions=sessions)
    study = f"SELECT files FROM studies WHERE study_instance_uid = '{task.study_instance_uid}'"
    files = rows(database_url, study)[0][0]
    files = json.loads(files) if isinstance(files, str) else files
    query = "SELECT source, status FROM predictions ORDER BY 1"
    before = rows(database_url, query)
    assert sorted(files) == [s for s, _ in before if s in files]
    assert all(s.startswith(str(export)) for s, _ in before)

    forced: list[dict[str, Any]] = []
    ingest_studies([export], ingest_host, forced.append, sessions=sessions, force=True)
    (again,) = [m for m in map(lambda m: parse_message((), m), forced) if m.files == task.files]
    Path(files[0]).write_bytes(b"DICM broken")
    second = ingest_host.with_overrides(ingest_root=mounts[1])
    process_study(again, settings=second, classifier=classifier, sessions=sessions)
    after = rows(database_url, query)
    assert [s for s, _ in after] == [s for s, _ in before], "one row per file, as ingest named it"
    assert dict(after)[files[0]] == "rejected"


def test_a_failure_the_database_cannot_record_is_raised_and_logged_without_file_paths(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = StudyTask("1.2.3.4", ("Doe^Jane/1.dcm",), "m-1")

    def unreachable() -> sessionmaker[Session]:
        return open_database("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")

    error = "OperationalError: connection refused"
    with caplog.at_level("ERROR"), pytest.raises(DatabaseError):
        record_failure(unreachable, task, "m-1", error, Settings())
    assert "study 1.2.3.4 failed (OperationalError: connection refused)" in caplog.text
    assert "Doe^Jane" not in caplog.text


def database_error(url: str, *statements: str, timeout: float = 5) -> Exception:
    """The error the statements raise, run one after another on one connection."""
    engine = create_engine(url, connect_args={"timeout": timeout} if "sqlite" in url else {})
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    except Exception as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"no error from {statements}")


@pytest.mark.services
def test_only_an_unreachable_busy_or_deadlocked_database_counts_as_unavailable(
    postgres_url: str, tmp_path: Path
) -> None:
    """Such a study is retried until the database is back; other database errors (a
    statement timeout, a missing table) would never go away and fail the study."""
    sqlite_url = f"sqlite:///{tmp_path / 'x.db'}"
    holder = create_engine(sqlite_url)
    with holder.connect() as conn:
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
        locked = database_error(sqlite_url, "CREATE TABLE t (x)", timeout=0)
    holder.dispose()
    deadlock = "DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = 'deadlock_detected'; END $$"
    unavailable = {
        "nobody listening": database_error("postgresql+psycopg://postgres@127.0.0.1:1/x"),
        "not set up": capture(lambda: open_database("postgresql+psycopg://u@127.0.0.1:1/x")),
        "deadlock": database_error(postgres_url, deadlock),
        "sqlite locked": locked,
    }
    permanent = {
        "statement timeout": database_error(
            postgres_url, "SET statement_timeout = 1", "SELECT pg_sleep(1)"
        ),
        "no such table": database_error(sqlite_url, "SELECT * FROM studies"),
        "no such relation": database_error(postgres_url, "SELECT * FROM studies"),
    }
    assert {k: is_database_unavailable(e) for k, e in unavailable.items()} == dict.fromkeys(
        unavailable, True
    )
    assert {k: is_database_unavailable(e) for k, e in permanent.items()} == dict.fromkeys(
        permanent, False
    )


def capture(call: Any) -> Exception:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


@pytest.mark.services
@pytest.mark.slow
def test_ingest_and_worker_write_exactly_the_rows_run_writes(
    postgres_url: str, sqlite_url: str, dicom_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    env = worker_env(REDIS_URL, postgres_url, model_dir)
    out = ingest(dicom_dir, env)
    n = int(out.split("queued ")[1].split()[0])
    worker = Worker(env, tmp_path / "worker.log", concurrency=2)
    try:
        wait_for(lambda: all_final(postgres_url, n), 180, "every study")
    finally:
        worker.stop()
        client.flushdb()
        client.close()
    run([dicom_dir], Settings(database_url=sqlite_url, model=model_dir, workers=2))
    assert predictions(postgres_url) == predictions(sqlite_url)
    study_columns = (
        "SELECT study_instance_uid, status, reason, n_instances, n_screened, n_rejected, "
        "n_failed, round(covid_probability * 10000), predicted_label, accession_number, "
        "patient_ref, CAST(study_date AS TEXT) FROM studies ORDER BY 1"
    )
    assert rows(postgres_url, study_columns) == rows(sqlite_url, study_columns)


def test_a_batch_that_cannot_be_split_goes_back_on_the_queue_whole() -> None:
    """Celery drops a message whose task raises (acks on failure off); Reject requeues it."""
    sent: list[dict[str, Any]] = []

    def broker_fails_after_one(message: dict[str, Any]) -> None:
        if sent:
            raise redis.ConnectionError("Connection refused")
        sent.append(message)

    tasks = [parse_message((), {**GOOD, "study_instance_uid": f"1.2.3.{i}"}) for i in range(3)]
    with pytest.raises(Reject) as caught:
        split_batch(tasks, broker_fails_after_one)
    assert caught.value.requeue and len(sent) == 1


# --- a study whose files change between ingests --------------------------------------


class ChangingStudy:
    """One study of real DICOM films in an export that gains, loses or breaks files
    between ingests; messages are collected and delivered by hand, in any order."""

    STUDY = "1.2.826.0.1.3680043.10.4.1"

    def __init__(self, root: Path, database_url: str, model_dir: Path, cxr_dir: Path) -> None:
        self.export = root / "export"
        self.pngs = sorted((cxr_dir / "test" / "covid").glob("*.png"))
        self.settings = Settings(database_url=database_url, model=model_dir)
        self.sessions = open_database(database_url)
        self.classifier = Classifier(model_dir)
        self.url = database_url

    def add(self, n: int) -> Path:
        ds = base_dataset(png_pixels(self.pngs[n]), study_uid=self.STUDY)
        return write(ds, self.export / f"IM{n:04d}.dcm")

    def ingest(self, force: bool = False) -> list[StudyTask]:
        sent: list[dict[str, Any]] = []
        ingest_studies(
            [self.export], self.settings, sent.append, sessions=self.sessions, force=force
        )
        return [parse_message((), m) for m in sent]

    def deliver(self, task: StudyTask) -> str:
        return process_study(
            task, settings=self.settings, classifier=self.classifier, sessions=self.sessions
        )

    def rows(self) -> dict[str, tuple[object, ...]]:
        found = rows(
            self.url,
            "SELECT source, status, sop_instance_uid IS NOT NULL, study_instance_uid "
            "FROM predictions ORDER BY source",
        )
        return {Path(r[0]).name: r[1:] for r in found}

    def study(self) -> tuple[object, ...]:
        (row,) = rows(self.url, "SELECT status, n_instances, n_screened FROM studies")
        return row


@pytest.fixture()
def changing(tmp_path: Path, database_url: str, model_dir: Path, cxr_dir: Path) -> ChangingStudy:
    return ChangingStudy(tmp_path, database_url, model_dir, cxr_dir)


def test_a_film_added_while_the_study_waits_in_the_queue_is_screened(
    changing: ChangingStudy,
) -> None:
    """The older message (2 films) was screened first; the newer one (3 films) was then
    skipped as finished, and the third film never got a row."""
    changing.add(0), changing.add(1)
    (older,) = changing.ingest()
    changing.add(2)
    (newer,) = changing.ingest()
    assert changing.deliver(older) == "screened"
    assert changing.deliver(newer) == "screened"
    assert set(changing.rows()) == {"IM0000.dcm", "IM0001.dcm", "IM0002.dcm"}
    assert changing.study() == ("screened", 3, 3)
    assert changing.deliver(newer) == "skipped", "delivered again: nothing new"
    assert changing.ingest() == [], "every film has its row: nothing to queue"


def test_a_film_added_after_the_study_was_screened_is_queued_by_the_next_ingest(
    changing: ChangingStudy,
) -> None:
    changing.add(0)
    (first,) = changing.ingest()
    assert changing.deliver(first) == "screened"
    changing.add(1)
    (again,) = changing.ingest()
    assert again.files == (str(changing.export / "IM0001.dcm"),), "only the film it lacks"
    assert changing.deliver(again) == "screened"
    assert changing.study() == ("screened", 2, 2), "the result sums up both films"
    assert changing.ingest() == []


def test_an_ingest_that_meets_a_screened_film_mid_copy_keeps_its_result(
    changing: ChangingStudy,
) -> None:
    """The unreadable copy's row replaced the film's screened row; the study, final, was
    never queued again, and its result named a film that had no row."""
    changing.add(0)
    whole = changing.add(1).read_bytes()
    (first,) = changing.ingest()
    assert changing.deliver(first) == "screened"
    (changing.export / "IM0001.dcm").write_bytes(whole[:100])
    assert changing.ingest() == []
    (changing.export / "IM0001.dcm").write_bytes(whole)
    assert changing.ingest() == []
    assert [r[:2] for r in changing.rows().values()] == [("screened", True)] * 2


def test_a_second_delivery_of_a_forced_message_is_skipped_once_it_is_screened(
    changing: ChangingStudy,
) -> None:
    """``--force`` overrode a final result at every delivery: a duplicate that then
    failed (out of memory, a time limit) replaced the screened result with `failed`."""
    changing.add(0)
    (first,) = changing.ingest()
    assert changing.deliver(first) == "screened"
    (forced,) = changing.ingest(force=True)
    assert changing.deliver(forced) == "screened"
    assert changing.deliver(forced) == "skipped"
    (again,) = changing.ingest(force=True)
    assert changing.deliver(again) == "screened", "a new --force screens it again"


def test_a_film_gone_before_the_worker_read_it_keeps_a_row_of_its_study(
    changing: ChangingStudy,
) -> None:
    """Its row had no study (no header to read): the study's rows and counts missed it."""
    for n in range(3):
        changing.add(n)
    (first,) = changing.ingest()
    (changing.export / "IM0002.dcm").unlink()
    assert changing.deliver(first) == "screened"
    assert changing.rows()["IM0002.dcm"] == ("rejected", False, ChangingStudy.STUDY)
    assert changing.study() == ("screened", 3, 2)


def test_a_study_split_over_two_exports_keeps_both_results_and_settles(
    changing: ChangingStudy,
) -> None:
    """Late films in the next day's folder: each ingest of one folder re-screened the
    study with that folder's films only and deleted the other's rows - a covid result
    flipped to normal and back at every ingest."""
    day1, day2 = changing.export / "day1", changing.export / "day2"
    changing.add(0).rename(_in(day1, "IM0000.dcm"))
    changing.export = day1
    (first,) = changing.ingest()
    assert changing.deliver(first) == "screened"
    changing.export = day2
    changing.add(1)
    (late,) = changing.ingest()
    assert changing.deliver(late) == "screened"
    assert changing.study() == ("screened", 2, 2)
    for folder in (day1, day2):
        changing.export = folder
        assert changing.ingest() == [], "nothing new: no re-screening"
    assert len(changing.rows()) == 2


def test_a_film_replaced_in_place_or_broken_at_the_worker_is_screened_again(
    changing: ChangingStudy,
) -> None:
    """The paths matched, so a new instance at a known path, or a film the worker found
    half-copied, was never screened."""
    changing.add(0)
    whole = changing.add(1).read_bytes()
    (changing.export / "IM0001.dcm").write_bytes(whole[:300])  # mid-copy at the worker
    (first,) = changing.ingest()  # its header, at the start of the file, still reads
    assert changing.deliver(first) == "screened"
    assert changing.rows()["IM0001.dcm"][:2] == ("rejected", False)
    (changing.export / "IM0001.dcm").write_bytes(whole)
    (again,) = changing.ingest()
    assert changing.deliver(again) == "screened"
    assert changing.rows()["IM0001.dcm"][:2] == ("screened", True)
    changing.add(2).rename(changing.export / "IM0000.dcm")  # another film at IM0000.dcm
    (replaced,) = changing.ingest()
    assert changing.deliver(replaced) == "screened"
    assert changing.study() == ("screened", 2, 2)


def _in(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_a_copy_sent_again_under_another_name_is_screened_once_and_settles(
    changing: ChangingStudy,
) -> None:
    """Screened alone, the copy took the instance's row from the first file, which then
    lacked one: the two names were queued in turn at every ingest."""
    first_file = changing.add(0)
    (first,) = changing.ingest()
    assert changing.deliver(first) == "screened"
    shutil.copy(first_file, changing.export / "IM0000-resent.dcm")
    (again,) = changing.ingest()
    assert len(again.files) == 2, "with the file it is a copy of"
    assert changing.deliver(again) == "screened"
    assert changing.ingest() == [] and changing.ingest() == []
    assert changing.study() == ("screened", 1, 1)


def test_new_films_that_fail_leave_the_study_its_earlier_result(
    changing: ChangingStudy,
) -> None:
    """The failed screening has no threshold: the study kept its probability but lost
    its label and threshold, and left the positive list."""
    changing.add(0)
    (first,) = changing.ingest()
    assert changing.deliver(first) == "screened"
    (label,) = rows(changing.url, "SELECT predicted_label, threshold FROM studies")
    changing.add(1)
    (late,) = changing.ingest()
    files = worker_files(late, None)
    version = changing.classifier.model_version
    save_failure(changing.sessions, late, files, version, "time limit exceeded", changing.settings)
    assert rows(changing.url, "SELECT predicted_label, threshold FROM studies") == [label]
    assert changing.study() == ("screened", 2, 1)
    again: list[dict[str, Any]] = []
    assert requeue(changing.settings, again.append, sessions=changing.sessions).sent == [
        late.study_instance_uid
    ], "requeue --failed sends the study with a failed file"
    assert changing.study() == ("queued", 2, 1)
    assert requeue(changing.settings, again.append, sessions=changing.sessions).sent == [], (
        "queued again, it is no longer a failed study: each requeue sent it once more"
    )
    (resent,) = (parse_message((), m) for m in again)
    assert resent.files == late.files
    assert changing.deliver(resent) == "screened"
    assert changing.study() == ("screened", 2, 2)
