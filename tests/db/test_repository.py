"""The bookkeeping writes a worker makes per study, on both databases."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.models import Study, utcnow
from db.repository import (
    Take,
    fail_unfinished,
    mark_failed,
    mark_processing,
    queue_studies,
    save_instances,
    save_study,
    stale_studies,
)
from db.session import open_database
from tests.dicom_factory import base_dataset, png_pixels, write
from worker.imaging.dicom import InstanceHeader
from worker.imaging.enum import Status
from worker.metrics import metrics
from worker.model import Classifier
from worker.queue.consume import delivery_limit, process_study, save_failure
from worker.queue.messages import StudyTask, worker_files
from worker.screening import InstanceResult, failed_outcome

UID, VERSION = "1.2.826.0.1.3680043.8.498.1", "m-1"


def study_row(sessions: object, uid: str = UID) -> tuple[str, int]:
    with sessions() as session:  # type: ignore[operator]
        row = session.execute(
            text("SELECT status, attempts FROM studies WHERE study_instance_uid = :u"), {"u": uid}
        ).one()
    return row.status, row.attempts


def test_the_processing_marker_counts_deliveries_and_leaves_final_studies_alone(
    database_url: str,
) -> None:
    sessions = open_database(database_url)
    with sessions.begin() as session:
        queue_studies(session, [{"study_instance_uid": UID, "files": ["a.dcm"]}], VERSION)
    counts = []
    for _ in range(3):
        with sessions.begin() as session:
            counts.append(mark_processing(session, UID, VERSION, ["a.dcm"]))
    assert counts == [1, 2, 3]
    assert study_row(sessions) == ("processing", 3)

    with sessions.begin() as session:
        session.execute(text("UPDATE studies SET status = 'screened'"))
        assert mark_processing(session, UID, VERSION, ["a.dcm"]) is None
    assert study_row(sessions) == ("screened", 3)
    with sessions.begin() as session:
        # taken again for files it lacks: a new delivery count (the old one split batches)
        assert mark_processing(session, UID, VERSION, ["a.dcm"], take=Take.ANY) == 1
    assert study_row(sessions) == ("processing", 1)


def test_the_marker_creates_the_row_of_a_study_nobody_queued(database_url: str) -> None:
    sessions = open_database(database_url)
    with sessions.begin() as session:
        assert mark_processing(session, UID, VERSION, ["b.dcm", "a.dcm"]) == 1
    with sessions() as session:
        row = session.execute(text("SELECT status, n_instances, files FROM studies")).one()
    assert row.status == "processing" and row.n_instances == 2
    with sessions.begin() as session:
        mark_failed(session, UID, VERSION, "lost")
        assert mark_processing(session, UID, VERSION, ["a.dcm"]) == 2


@dataclass
class OneStudy:
    """A real DICOM study, the shipped model and a SQLite results file."""

    settings: Settings
    sessions: sessionmaker[Session]
    classifier: Classifier
    files: list[str]
    task: StudyTask

    def process(self) -> str:
        return process_study(
            self.task, settings=self.settings, classifier=self.classifier, sessions=self.sessions
        )


@pytest.fixture()
def one_study(sqlite_url: str, model_dir: Path, dicom_dir: Path) -> OneStudy:
    classifier = Classifier(model_dir)
    files = [str(next((dicom_dir / "cxr").glob("*.dcm")))]
    return OneStudy(
        Settings(database_url=sqlite_url, model=model_dir),
        open_database(sqlite_url),
        classifier,
        files,
        StudyTask(UID, tuple(files), classifier.model_version),
    )


def test_a_study_delivered_past_the_limit_is_failed_not_screened(one_study: OneStudy) -> None:
    settings, sessions, files = one_study.settings, one_study.sessions, one_study.files
    with sessions.begin() as session:
        for _ in range(delivery_limit(settings)):
            mark_processing(session, UID, one_study.classifier.model_version, files)
    failed_before = failed_studies_counted()
    assert one_study.process() == "failed"
    assert failed_studies_counted() == failed_before + 1, "the metric counts it too"
    status, attempts = study_row(sessions)
    assert (status, attempts) == ("failed", delivery_limit(settings) + 1)
    with sessions() as session:
        reason = session.execute(text("SELECT reason FROM studies")).scalar_one()
    assert reason.startswith(f"gave up after {delivery_limit(settings)} deliveries")


@pytest.mark.parametrize("from_queue", [False, True])
def test_a_study_screened_again_counts_from_when_it_was_received_again(
    database_url: str, from_queue: bool
) -> None:
    """``run`` over an export again: the study was received anew. Keeping the first
    queued_at made its turnaround the days between the runs, on the day of the second."""
    sessions = open_database(database_url)
    week_ago = utcnow() - dt.timedelta(days=7)
    first = failed_outcome(UID, ["a.dcm"], VERSION, "first")
    again = failed_outcome(UID, ["a.dcm"], VERSION, "again")
    settings = {"patient_id_mode": Settings().patient_id_mode, "hash_key": "k"}
    with sessions.begin() as session:
        save_study(session, replace(first, started_at=week_ago, finished_at=week_ago), **settings)
    with sessions.begin() as session:
        save_study(session, again, from_queue=from_queue, **settings)
    with sessions() as session:
        queued_at = session.execute(select(Study.queued_at)).scalar_one()
    received = week_ago if from_queue else again.started_at  # ingest's queued_at stays
    assert queued_at.replace(tzinfo=queued_at.tzinfo or dt.UTC) == received  # SQLite: naive


def test_stale_studies_are_those_queued_or_taken_before_the_cutoff(database_url: str) -> None:
    sessions = open_database(database_url)
    ages = {"1.1": 3, "1.2": 1, "2.1": 3, "2.2": 1, "3.1": 3}  # hours since queued / taken
    with sessions.begin() as session:
        queue_studies(session, [{"study_instance_uid": u, "files": ["a"]} for u in ages], VERSION)
        for uid in ("2.1", "2.2"):
            mark_processing(session, uid, VERSION, ["a"])
        mark_failed(session, "3.1", VERSION, "lost")
        backdate = text(
            "UPDATE studies SET queued_at = :t, started_at = :t WHERE study_instance_uid = :u"
        )
        for uid, hours in ages.items():
            session.execute(backdate, {"t": utcnow() - dt.timedelta(hours=hours), "u": uid})
    with sessions() as session:
        stale = stale_studies(session, VERSION, utcnow() - dt.timedelta(hours=2))
        assert [s.study_instance_uid for s in stale] == ["1.1", "2.1"]
        assert stale_studies(session, "other", utcnow()) == []


def test_a_sop_instance_uid_of_another_study_in_one_transaction_keeps_both_rows(
    database_url: str,
) -> None:
    """Two studies of one batch message are saved in one transaction; the second's copy of
    a UID must not take over the first's row, and the first study's re-save updates its own."""
    sop = "1.2.826.0.1.3680043.8.498.99"

    def result(study: str, source: str, p: float, uid: str = sop) -> InstanceResult:
        header = InstanceHeader(uid, None, study, None, None, None, "CR", "PA")
        return InstanceResult(source, Status.SCREENED, header, covid_probability=p)

    sessions = open_database(database_url)
    for p in (0.1, 0.2):
        with sessions.begin() as session:
            own = [result(UID, "/x/a.dcm", p), result(UID, "/x/a2.dcm", p, sop + "1")]
            save_instances(session, own, VERSION, 0.5)
            other = [
                result(UID + "0", "/x/b.dcm", p + 0.5),
                result(UID + "0", "/x/b2.dcm", p, sop + "2"),
            ]
            save_instances(session, other, VERSION, 0.5)
    found = rows_of(
        sessions,
        "SELECT source, sop_instance_uid, duplicate_of, covid_probability "
        "FROM predictions ORDER BY source",
    )
    assert found == [
        ("/x/a.dcm", sop, None, 0.2),
        ("/x/a2.dcm", sop + "1", None, 0.2),
        ("/x/b.dcm", None, sop, 0.7),
        ("/x/b2.dcm", sop + "2", None, 0.2),
    ]


def rows_of(sessions: object, query: str) -> list[tuple[object, ...]]:
    with sessions() as session:  # type: ignore[operator]
        return [tuple(r) for r in session.execute(text(query))]


def failed_studies_counted() -> float:
    metrics()  # registers the worker's metrics in this process
    return REGISTRY.get_sample_value("cxr_studies_total", {"outcome": "failed"}) or 0.0


def test_a_failure_after_another_delivery_finished_the_study_is_neither_stored_nor_counted(
    one_study: OneStudy,
) -> None:
    assert one_study.process() in ("screened", "rejected")
    final = study_row(one_study.sessions)[0]
    failed_before = failed_studies_counted()
    version = one_study.classifier.model_version
    save_failure(
        one_study.sessions,
        one_study.task,
        worker_files(one_study.task, ingest_root=None),
        version,
        "timed out",
        one_study.settings,
    )
    assert study_row(one_study.sessions)[0] == final
    assert failed_studies_counted() == failed_before


@pytest.mark.parametrize("how", ["mark_failed", "fail_unfinished"])
def test_a_study_recorded_failed_keeps_no_earlier_result(database_url: str, how: str) -> None:
    """Screened covid, forced again, then failed (a model mismatch, a malformed message):
    the failed row kept 0.93 and `covid`, and stood in the positive studies."""
    sessions = open_database(database_url)
    with sessions.begin() as session:
        session.execute(
            Study.__table__.insert().values(  # type: ignore[attr-defined]
                study_instance_uid=UID,
                model_version=VERSION,
                status="screened",
                covid_probability=0.93,
                predicted_label="covid",
                threshold=0.2,
                n_instances=1,
                n_screened=1,
                queued_at=utcnow(),
            )
        )
        queue_studies(
            session, [{"study_instance_uid": UID, "files": ["a.dcm"]}], VERSION, force=True
        )
        if how == "mark_failed":
            mark_failed(session, UID, VERSION, "lost")
        else:
            fail_unfinished(session, [UID], VERSION, "malformed")
    found = rows_of(
        sessions,
        "SELECT status, covid_probability, predicted_label, threshold, n_screened FROM studies",
    )
    assert found == [("failed", None, None, None, 0)]


@pytest.mark.services
def test_a_file_holding_another_studys_film_since_ingest_is_not_scored_as_the_queued_one(
    database_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """A PACS re-export re-using IM1 between ingest and the worker: the queued study was
    screened with the other patient's film, probability and accession number, and the
    other study's own screening then deleted that row, leaving the queued study without
    one."""
    pixels = png_pixels(sorted((cxr_dir / "test" / "normal").glob("*.png"))[0])
    queued, other = base_dataset(pixels), base_dataset(pixels)
    queued.AccessionNumber, other.AccessionNumber = "ACC-QUEUED", "ACC-OTHER"
    path = write(queued, tmp_path / "export" / "IM1")
    classifier = Classifier(model_dir)
    settings = Settings(database_url=database_url, model=model_dir)
    sessions = open_database(database_url)

    def screen(uid: str) -> str:
        task = StudyTask(uid, (str(path),), classifier.model_version)
        return process_study(task, settings=settings, classifier=classifier, sessions=sessions)

    write(other, path)  # replaced after `queued` was ingested
    assert screen(queued.StudyInstanceUID) == "rejected"
    assert screen(other.StudyInstanceUID) == "screened"
    found = rows_of(
        sessions,
        "SELECT study_instance_uid, sop_instance_uid, status, reason_code FROM predictions "
        "ORDER BY status",
    )
    assert found == [
        (queued.StudyInstanceUID, None, "rejected", "other_study"),
        (other.StudyInstanceUID, other.SOPInstanceUID, "screened", None),
    ]
    studies = dict(rows_of(sessions, "SELECT study_instance_uid, accession_number FROM studies"))
    assert studies[queued.StudyInstanceUID] != "ACC-OTHER"
