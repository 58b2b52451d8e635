"""The Celery tasks in a real worker process: what a failure leaves in the logs and in
``studies.reason``."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.conftest import REDIS_URL
from tests.dicom_factory import base_dataset, png_pixels, write
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import all_final, ingest, worker_env
from tests.worker.test_run import rows

pytestmark = [pytest.mark.services, pytest.mark.slow]


def execute(url: str, statement: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(statement))
    engine.dispose()


def test_a_database_error_reaches_logs_and_reason_without_patient_data(
    postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    # Some exports name folders after the patient.
    write(base_dataset(png_pixels(png)), tmp_path / "export" / "Test^Patient" / "1.dcm")
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    env = worker_env(REDIS_URL, postgres_url, model_dir, patient_id_mode="clear")
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
        client.flushdb()
        client.close()
    ((status, reason),) = rows(postgres_url, "SELECT status, reason FROM studies")
    for private in ("TEST-PATIENT-0001", "ACC0001", "Test^Patient"):
        assert private not in reason and private not in log, private
    assert (status, reason) == (
        "failed",
        'unexpected error: IntegrityError: new row for relation "studies" violates check '
        'constraint "no_results"',
    )
    assert reason.removeprefix("unexpected error: ") in log
