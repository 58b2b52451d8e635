"""The Celery tasks in a real worker process: what a failure leaves in the logs and in
``studies.reason``."""

from __future__ import annotations

import copy
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import redis
from alembic.script import ScriptDirectory
from PIL import Image
from pydicom.uid import JPEGLSLossless, generate_uid

from config.settings import Settings
from db.repository import queue_studies
from db.session import DatabaseError, migrations_config, open_database
from tests.dicom_factory import base_dataset, png_pixels, write
from tests.sql import execute, rows
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import all_final, ingest, send_raw, worker_env
from worker.celery_app import QUEUE, SCREEN_BATCH_TASK, check_ready_to_work

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
    with Worker(env, tmp_path / "worker.log") as worker:
        wait_for(lambda: all_final(postgres_url, 1), 120, "the study to be recorded failed")
        log = worker.log()
    ((status, reason),) = rows(postgres_url, "SELECT status, reason FROM studies")
    for private in ("TEST-PATIENT-0001", "ACC0001", "Test^Patient"):
        assert private not in reason and private not in log, private
    assert (status, reason) == (
        "failed",
        'unexpected error: IntegrityError: new row for relation "studies" violates check '
        'constraint "no_results"',
    )
    assert reason.removeprefix("unexpected error: ") in log


def test_a_study_the_database_keeps_refusing_is_retried_past_the_limit_not_failed(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """The race CI met with PostgreSQL restarting: the screening's write fails as the
    database is unavailable, and the `failed` record just after it would succeed. Here a
    trigger refuses only the result, as a deadlock (an OperationalError), every time."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    write(base_dataset(png_pixels(png)), tmp_path / "export" / "1.dcm")
    env = worker_env(broker, postgres_url, model_dir, task_max_retries=1)
    ingest(tmp_path / "export", env)
    execute(
        postgres_url,
        """CREATE FUNCTION refuse_results() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'screened' THEN
                RAISE EXCEPTION 'refused' USING ERRCODE = 'deadlock_detected';
            END IF;
            RETURN NEW;
        END $$""",
    )
    execute(
        postgres_url,
        "CREATE TRIGGER refuse_results BEFORE INSERT OR UPDATE ON studies "
        "FOR EACH ROW EXECUTE FUNCTION refuse_results()",
    )
    past_limit = "database still unavailable"
    with Worker(env, tmp_path / "worker.log") as worker:
        wait_for(
            lambda: past_limit in worker.log() or all_final(postgres_url, 1),
            60,
            "a delivery past the retry limit",
        )
        assert rows(postgres_url, "SELECT status FROM studies") == [("processing",)]
        execute(postgres_url, "DROP TRIGGER refuse_results ON studies")
        wait_for(lambda: all_final(postgres_url, 1), 60, "the study to be screened")
    assert rows(postgres_url, "SELECT status, reason FROM studies") == [("screened", None)]


def test_queued_studies_a_refused_message_names_are_failed_with_the_reason(
    broker: str, postgres_url: str, model_dir: Path, tmp_path: Path
) -> None:
    # As ingest queued a study with a UID of letters before it checked UIDs.
    lettered, batched, unqueued = "1.2.826.0.1.3680043.2.1143.ABC", "1.2.3.5", "1.2.3.4"
    mixed = "1.2.3.6"
    sessions = open_database(postgres_url)
    with sessions.begin() as session:
        queued = [{"study_instance_uid": u, "files": ["a.dcm"]} for u in (lettered, batched, mixed)]
        queue_studies(session, queued, "m-1")
    send_raw(
        broker, kwargs={"study_instance_uid": lettered, "files": ["a.dcm"], "model_version": "m-1"}
    )
    # The study in a positional argument, an option as a keyword argument.
    body = {"study_instance_uid": mixed, "files": ["a.dcm"], "model_version": "m-1"}
    send_raw(broker, args=[body], kwargs={"force": True})
    # A batch refused as a whole (a study in it has no files): its queued study fails, and
    # no row is made for the other, which nobody queued.
    studies = [
        {"study_instance_uid": batched, "files": ["b.dcm"]},
        {"study_instance_uid": unqueued, "files": []},
    ]
    send_raw(broker, kwargs={"studies": studies, "model_version": "m-1"}, task=SCREEN_BATCH_TASK)
    with Worker(worker_env(broker, postgres_url, model_dir), tmp_path / "worker.log") as worker:
        # A task's return value is logged once it has recorded the studies.
        wait_for(lambda: worker.log().count(": 'malformed'") == 3, 60, "every message refused")
    found = dict(
        rows(postgres_url, "SELECT study_instance_uid, status || ': ' || reason FROM studies")
    )
    assert found == {
        lettered: "failed: malformed task message: study_instance_uid is not a DICOM UID "
        "(digits and dots, at most 64 characters)",
        batched: "failed: malformed task message: studies[1]: files must be a non-empty list "
        "of paths",
        mixed: "failed: malformed task message: expected keyword arguments only, got 1 positional",
    }


@pytest.mark.services
def test_a_refused_message_fails_its_study_while_the_model_no_longer_loads(
    broker: str, postgres_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """A pool process started after the model folder changed under the worker (a model
    copied over in place) cannot load it, and refusing a malformed message asked for the
    model's version: the message was dropped and its study stayed queued."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    lettered = "1.2.826.0.1.3680043.2.1143.XYZ"
    sessions = open_database(postgres_url)
    with sessions.begin() as session:
        queue_studies(session, [{"study_instance_uid": lettered, "files": ["a.dcm"]}], "m-1")
    sessions.kw["bind"].dispose()
    with Worker(worker_env(broker, postgres_url, model), tmp_path / "worker.log") as worker:
        wait_for(lambda: " ready." in worker.log() and worker.children(), 60, "the worker")
        (model / "model.tflite").write_text("not a model any more")
        (first,) = worker.children()
        os.kill(first, signal.SIGKILL)  # the pool process Celery starts instead cannot load it
        wait_for(lambda: worker.children() not in ([], [first]), 60, "a new pool process")
        body = {"study_instance_uid": lettered, "files": ["a.dcm"], "model_version": "m-1"}
        send_raw(broker, kwargs=body)
        wait_for(lambda: ": 'malformed'" in worker.log(), 60, "the message refused")
    assert rows(postgres_url, "SELECT status, reason FROM studies") == [
        (
            "failed",
            "malformed task message: study_instance_uid is not a DICOM UID "
            "(digits and dots, at most 64 characters)",
        )
    ]


def slow_study(folder: Path, cxr_dir: Path, n_files: int) -> None:
    """One study of 2,500 x 2,500 12-bit JPEG-LS images, about 0.1 s each to decode."""
    pixels = png_pixels(sorted((cxr_dir / "test" / "normal").glob("*.png"))[0])
    big = np.asarray(Image.fromarray(pixels).resize((2500, 2500)), dtype=np.uint16) * 16
    noise = np.random.default_rng(0).integers(0, 16, big.shape, dtype=np.uint16)
    template = base_dataset(big + noise, bits=12)
    template.WindowCenter, template.WindowWidth = 2040.5, 4081
    template.compress(JPEGLSLossless)
    for i in range(n_files):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        write(ds, folder / f"{i:02d}.dcm")


def test_a_study_past_the_soft_time_limit_is_recorded_failed_as_a_whole(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    n = 30  # about 3 s of decoding
    slow_study(tmp_path / "export", cxr_dir, n)
    env = worker_env(broker, postgres_url, model_dir, task_time_limit=2)  # soft limit 1 s
    ingest(tmp_path / "export", env)
    with redis.Redis.from_url(broker) as client, Worker(env, tmp_path / "worker.log") as worker:
        wait_for(lambda: all_final(postgres_url, 1), 120, "the study to be recorded")
        wait_for(lambda: client.llen(QUEUE) + client.hlen("unacked") == 0, 30, "the ack")
        log, alive = worker.log(), worker.alive()
    reason = "time limit exceeded (2 s)"
    assert rows(postgres_url, "SELECT status, reason, n_failed, attempts FROM studies") == [
        ("failed", reason, n, 1)
    ]
    # Not one image stored as failed (or rejected) by the limit while the others screened.
    outcomes = "SELECT status, reason_code, reason, count(*) FROM predictions GROUP BY 1, 2, 3"
    assert rows(postgres_url, outcomes) == [("failed", "error", reason, n)]
    assert "Hard time limit" not in log and alive


def test_the_workers_time_limit_governs_not_the_one_of_ingest(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    """Celery put the publisher's limits in each message, over the worker's."""
    slow_study(tmp_path / "export", cxr_dir, 30)
    ingest(tmp_path / "export", worker_env(broker, postgres_url, model_dir))  # 300 s
    env = worker_env(broker, postgres_url, model_dir, task_time_limit=2)
    with Worker(env, tmp_path / "worker.log") as worker:
        wait_for(lambda: all_final(postgres_url, 1), 120, "the study to be recorded")
        log = worker.log()
    assert "Soft time limit (1s) exceeded" in log
    assert rows(postgres_url, "SELECT status, reason FROM studies") == [
        ("failed", "time limit exceeded (2 s)")
    ]


def test_a_worker_facing_a_schema_a_newer_cxr_screen_wrote_does_not_start(
    model_dir: Path, sqlite_url: str
) -> None:
    """It started, and retried every message for ever: it could record neither a
    result nor the failure."""
    open_database(sqlite_url).kw["bind"].dispose()
    execute(sqlite_url, "UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(DatabaseError, match="a newer cxr-screen wrote it; upgrade this one"):
        check_ready_to_work(Settings(model=model_dir, database_url=sqlite_url))


def test_a_worker_started_before_any_run_makes_a_private_sqlite_file_at_the_schema(
    model_dir: Path, tmp_path: Path
) -> None:
    """The start-up check once connected and so created the file, readable by every
    local user; it now upgrades, once, before the pool processes start."""
    path = tmp_path / "results.db"
    check_ready_to_work(Settings(model=model_dir, database_url=f"sqlite:///{path}"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert rows(f"sqlite:///{path}", "SELECT version_num FROM alembic_version") == [
        (ScriptDirectory.from_config(migrations_config()).get_current_head(),)
    ]


@pytest.mark.parametrize(("visibility", "warned"), [(300, True), (3600, False)])
def test_a_visibility_timeout_shorter_than_a_task_is_warned_of_at_start(
    visibility: int,
    warned: bool,
    model_dir: Path,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The README says it must be longer, or a study still being screened is handed to
    another worker; nothing said so when it was not."""
    settings = Settings(
        model=model_dir, database_url=sqlite_url, visibility_timeout=visibility, task_time_limit=300
    )
    with caplog.at_level("WARNING", logger="worker.celery_app"):
        check_ready_to_work(settings)
    assert ("CXR_VISIBILITY_TIMEOUT (300 s) is not longer" in caplog.text) is warned, caplog.text
