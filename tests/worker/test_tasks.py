"""The Celery tasks in a real worker process: what a failure leaves in the logs and in
``studies.reason``."""

from __future__ import annotations

from pathlib import Path

import pytest

from db.repository import queue_studies
from db.session import open_database
from tests.dicom_factory import base_dataset, png_pixels, write
from tests.sql import execute, rows
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import all_final, ingest, send_raw, worker_env
from worker.celery_app import SCREEN_BATCH_TASK

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_a_database_error_reaches_logs_and_reason_without_patient_data(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    # Some exports name folders after the patient.
    write(base_dataset(png_pixels(png)), tmp_path / "export" / "Test^Patient" / "1.dcm")
    env = worker_env(broker, postgres_url, model_dir, patient_id_mode="clear")
    ingest(tmp_path / "export", env)
    # The database refuses the result: PostgreSQL's error quotes the refused row.
    execute(
        postgres_url, "ALTER TABLE studies ADD CONSTRAINT no_results CHECK (status <> 'screened')"
    )
    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: all_final(postgres_url, 1), 120, "the study to be recorded failed")
        log = worker.log()
    finally:
        worker.stop()
    ((status, reason),) = rows(postgres_url, "SELECT status, reason FROM studies")
    for private in ("TEST-PATIENT-0001", "ACC0001", "Test^Patient"):
        assert private not in reason and private not in log, private
    assert (status, reason) == (
        "failed",
        'unexpected error: IntegrityError: new row for relation "studies" violates check '
        'constraint "no_results"',
    )
    assert reason.removeprefix("unexpected error: ") in log


def test_queued_studies_a_refused_message_names_are_failed_with_the_reason(
    broker: str, postgres_url: str, model_dir: Path, tmp_path: Path
) -> None:
    # As ingest queued a study with a UID of letters before it checked UIDs.
    lettered, batched, unqueued = "1.2.826.0.1.3680043.2.1143.ABC", "1.2.3.5", "1.2.3.4"
    sessions = open_database(postgres_url)
    with sessions.begin() as session:
        queued = [{"study_instance_uid": u, "files": ["a.dcm"]} for u in (lettered, batched)]
        queue_studies(session, queued, "m-1")
    send_raw(
        broker, kwargs={"study_instance_uid": lettered, "files": ["a.dcm"], "model_version": "m-1"}
    )
    # A batch refused as a whole (a study in it has no files): its queued study fails, and
    # no row is made for the other, which nobody queued.
    studies = [
        {"study_instance_uid": batched, "files": ["b.dcm"]},
        {"study_instance_uid": unqueued, "files": []},
    ]
    send_raw(broker, kwargs={"studies": studies, "model_version": "m-1"}, task=SCREEN_BATCH_TASK)
    worker = Worker(worker_env(broker, postgres_url, model_dir), tmp_path / "worker.log")
    try:
        # A task's return value is logged once it has recorded the studies.
        wait_for(lambda: worker.log().count(": 'malformed'") == 2, 60, "both messages refused")
    finally:
        worker.stop()
    found = dict(
        rows(postgres_url, "SELECT study_instance_uid, status || ': ' || reason FROM studies")
    )
    assert found == {
        lettered: "failed: malformed task message: study_instance_uid is not a DICOM UID: "
        f"{lettered!r}",
        batched: "failed: malformed task message: files must be a non-empty list of paths",
    }
