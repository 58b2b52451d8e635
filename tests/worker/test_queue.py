"""The distributed pipeline's logic (messages, ingest, one queued study, requeue) and
the end-to-end equivalence of ``ingest`` + ``worker`` with ``run``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import Settings
from db.session import open_database
from tests.conftest import REDIS_URL
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import all_final, ingest, rows, worker_env
from tests.worker.test_run import predictions
from worker.celery_app import celery_config
from worker.model import Classifier
from worker.queue import (
    IngestError,
    MalformedTask,
    StudyTask,
    backoff,
    message_paths,
    parse_message,
    process_study,
    requeue_failed,
    worker_paths,
)
from worker.queue import (
    ingest as ingest_studies,
)
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
        ({"files": []}, "non-empty list"),
        ({"files": ["../x.dcm"]}, "escapes the ingest root"),
        ({"model_version": 3}, "model_version"),
        ({"force": "yes"}, "force"),
        ({"pixels": "..."}, "unknown fields"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedTask, match=message):
        parse_message((), {**GOOD, **change})


def test_messages_round_trip_and_paths_are_relative_to_the_ingest_root(tmp_path: Path) -> None:
    task = parse_message((), GOOD)
    assert parse_message((), task.message()) == task
    root = tmp_path / "export"
    assert message_paths([str(root / "s" / "1.dcm")], root) == ["s/1.dcm"]
    assert worker_paths(["s/1.dcm"], Path("/mnt/pacs")) == ["/mnt/pacs/s/1.dcm"]
    with pytest.raises(IngestError, match="not under the ingest root"):
        message_paths(["/elsewhere/1.dcm"], root)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    settings = Settings(visibility_timeout=3600)
    rng = random.Random(1)
    waits = [backoff(n, settings, rng) for n in range(12)]
    for n, wait in enumerate(waits[:6]):
        assert 2**n <= wait <= 2 ** (n + 1)
    assert max(waits) <= 300
    assert backoff(20, Settings(visibility_timeout=10), rng) <= 5


def test_ingest_and_one_study_in_process(
    tmp_path: Path, sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    settings = Settings(database_url=sqlite_url, model=model_dir)
    sessions = open_database(sqlite_url)
    sent: list[dict[str, Any]] = []
    summary = ingest_studies([dicom_dir / "cxr"], settings, sent.append, sessions=sessions)
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


def test_a_model_mismatch_screens_with_the_workers_model_and_says_so(
    sqlite_url: str, model_dir: Path, dicom_dir: Path
) -> None:
    settings = Settings(database_url=sqlite_url, model=model_dir)
    sessions = open_database(sqlite_url)
    sent: list[dict[str, Any]] = []
    ingest_studies([dicom_dir / "cxr"], settings, sent.append, sessions=sessions)
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


def test_failed_studies_are_requeued(sqlite_url: str, model_dir: Path, dicom_dir: Path) -> None:
    from db.repository import mark_failed

    settings = Settings(database_url=sqlite_url, model=model_dir)
    sessions = open_database(sqlite_url)
    sent: list[dict[str, Any]] = []
    ingest_studies([dicom_dir / "cxr"], settings, sent.append, sessions=sessions)
    uid = sent[0]["study_instance_uid"]
    with sessions.begin() as session:
        mark_failed(session, uid, sent[0]["model_version"], "OperationalError: db down")
    again: list[dict[str, Any]] = []
    assert requeue_failed(settings, again.append, sessions=sessions) == [uid]
    assert again[0]["files"] == sent[0]["files"]
    assert rows(sqlite_url, f"SELECT status FROM studies WHERE study_instance_uid = '{uid}'") == [
        ("queued",)
    ]


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
