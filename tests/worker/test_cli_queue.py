"""The distributed commands as a person runs them: ``cxr-screen worker`` and ``requeue``."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from config.settings import Settings
from db.repository import mark_processing
from db.session import open_database
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.sql import rows
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import all_final, cli, ingest, python_module, worker_env
from worker.celery_app import QUEUE
from worker.model import read_card
from worker.runner import run

# Its own Redis database: this worker must not take messages other tests queue.
IDLE_BROKER = REDIS_URL.rsplit("/", 1)[0] + "/12"


@contextmanager
def cli_worker(
    database_url: str, model_dir: Path, tmp_path: Path, *flags: str, ready: bool = True
) -> Iterator[Worker]:
    """``cxr-screen worker --concurrency 1 FLAGS`` on the idle broker, ready unless told
    not to wait; stopped, and its broker database emptied, afterwards."""
    worker = Worker(
        worker_env(IDLE_BROKER, database_url, model_dir, log_level="INFO"),
        tmp_path / "worker.log",
        command=["worker", "worker", "--concurrency", "1", *flags],
    )
    try:
        if ready:
            wait_for(lambda: " ready." in worker.log(), 60, "the worker to be ready")
        yield worker
    finally:
        worker.stop()
        redis.Redis.from_url(IDLE_BROKER).flushdb()


@pytest.mark.services
def test_worker_loglevel_overrides_the_configured_level(
    model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    with cli_worker(sqlite_url, model_dir, tmp_path, "--loglevel", "DEBUG") as worker:
        # Logged after Celery has set up logging (the flag was applied before that).
        assert "DEBUG celery.bootsteps" in worker.log(), worker.log()[-3000:]


@pytest.mark.services
def test_the_worker_pool_defaults_to_the_cores_it_may_use(
    model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """Celery's default is every core of the host: a container allowed 2 of a 32-core
    host's started 32 pool processes, each holding the model."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("needs 2 cores or more to tell the two apart")
    os.sched_setaffinity(0, {min(allowed)})  # the worker inherits it
    try:
        worker = Worker(
            worker_env(IDLE_BROKER, sqlite_url, model_dir),
            tmp_path / "worker.log",
            command=["worker", "worker"],
        )
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        wait_for(lambda: " ready." in worker.log(), 60, "the worker to be ready")
        assert "concurrency: 1 (prefork)" in worker.log(), worker.log()[-3000:]
    finally:
        worker.stop()
        redis.Redis.from_url(IDLE_BROKER).flushdb()


@pytest.mark.services
def test_cxr_screen_worker_checks_once_before_it_starts(model_dir: Path, tmp_path: Path) -> None:
    """The command checked, then Celery's worker_init checked again: the model loaded
    twice and every start-up warning was logged twice."""
    down = "postgresql+psycopg://postgres@127.0.0.1:1/test"  # nothing listens there
    with cli_worker(down, model_dir, tmp_path) as worker:
        log = worker.log()
    assert log.count("the database does not answer yet") == 1, log[-3000:]


@pytest.mark.services
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_worker_stopped_on_purpose_exits_0(
    stop: signal.Signals, model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """Ctrl-C exited 1 (Celery's status for it) once that status was passed on."""
    with cli_worker(sqlite_url, model_dir, tmp_path) as worker:
        os.kill(worker.pid, stop)
        worker.process.wait(timeout=60)
        log = worker.log()
    assert "Warm shutdown" in log, log[-3000:]
    assert worker.process.returncode == 0


@pytest.mark.services
def test_a_worker_celery_stops_on_an_unrecoverable_error_exits_non_zero(
    model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """It exited 0 (worker_main drops Celery's exit code): a supervisor restarting it on
    failure left it stopped, and a check on the code saw a clean shutdown."""
    with redis.Redis.from_url(IDLE_BROKER) as client:
        client.lpush(QUEUE, "not a Celery message")  # kombu cannot decode it: unrecoverable
    with cli_worker(sqlite_url, model_dir, tmp_path, ready=False) as worker:
        worker.process.wait(timeout=120)
        log = worker.log()
    assert "Unrecoverable error" in log, log[-3000:]
    assert worker.process.returncode not in (0, None)


@pytest.mark.services
@pytest.mark.slow
def test_requeue_stale_sends_a_study_stranded_in_processing(
    broker: str, postgres_url: str, model_dir: Path, dicom_dir: Path, tmp_path: Path
) -> None:
    env = worker_env(broker, postgres_url, model_dir)
    ingest(dicom_dir / "cxr" / "nih_dx_chest_implicitvr_8bit.dcm", env)
    (uid,) = rows(postgres_url, "SELECT study_instance_uid FROM studies")[0]
    # A worker took the study, and its message was acknowledged without a result (retries
    # ran out while the database was down): nothing on the queue will finish it.
    redis.Redis.from_url(broker).flushdb()
    with open_database(postgres_url).begin() as session:
        mark_processing(session, uid, read_card(model_dir).model_version, [])
    assert "requeued 0 studies" in cli("requeue", "--stale", env=env).stdout  # not 2 h old yet
    out = cli("requeue", "--stale", "--stale-minutes", "0", env=env).stdout
    assert "requeued 1 studies" in out
    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_for(lambda: all_final(postgres_url, 1), 60, "the requeued study")
    finally:
        worker.stop()
    assert rows(postgres_url, "SELECT status FROM studies") == [("screened",)]


@pytest.mark.services
def test_ingest_with_the_broker_down_writes_nothing_and_says_so_in_one_line(
    model_dir: Path, sqlite_url: str, dicom_dir: Path
) -> None:
    """It marked the studies queued (over their results, with --force) and then died in a
    kombu traceback: the results vanished from every report until a requeue."""
    run([dicom_dir / "cxr"], Settings(database_url=sqlite_url, model=model_dir, workers=1))
    before = rows(sqlite_url, "SELECT study_instance_uid, status FROM studies ORDER BY 1")
    env = worker_env("redis://127.0.0.1:1/0", sqlite_url, model_dir)  # nothing listens there
    done = python_module("worker", "ingest", str(dicom_dir / "cxr"), "--force", env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: cannot reach the broker at redis://127.0.0.1:1/0: Error 111 connecting to "
        "127.0.0.1:1. Connection refused."
    ]
    assert rows(sqlite_url, "SELECT study_instance_uid, status FROM studies ORDER BY 1") == before


@pytest.mark.parametrize("command", [["ingest", "."], ["status"], ["worker"]])
@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redsi://127.0.0.1:6379/0", "not a Redis URL (redsi://): use redis:// or rediss://"),
        ("amqp://guest@127.0.0.1:1//", "not a Redis URL (amqp://): use redis:// or rediss://"),
        ("redis://127.0.0.1:6379/abc", "the Redis database is a number (redis://host:6379/0)"),
    ],
)
def test_a_broker_url_that_is_not_a_redis_database_is_one_line(
    command: list[str], url: str, why: str, model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """A typo in the scheme gave Celery's KeyError (ingest: after marking the studies
    queued) or redis-py's ValueError, each a traceback; ``/abc`` passed the broker check
    as database 0 and failed in kombu, the studies left queued; amqp:// left status,
    the queue-depth metric and requeue reading a Redis that was not there."""
    open_database(sqlite_url).kw["bind"].dispose()
    env = worker_env(url, sqlite_url, model_dir)
    done = python_module("worker", *command, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: CXR_BROKER_URL: {why}"]
    assert rows(sqlite_url, "SELECT count(*) FROM studies") == [(0,)]


def test_status_on_a_mistyped_database_path_is_an_error_not_a_new_empty_database(
    model_dir: Path, tmp_path: Path
) -> None:
    """It created the file and reported every count as 0 with exit 0: a healthy queue."""
    typo = tmp_path / "resluts.db"
    env = worker_env("redis://127.0.0.1:1/0", f"sqlite:///{typo}", model_dir)
    done = python_module("worker", "status", env=env)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip() == (
        f"error: no results database at {typo} (check --database-url or CXR_DATABASE_URL)"
    )
    assert list(tmp_path.iterdir()) == []


def broken_model(model_dir: Path, folder: Path) -> Path:
    """The card beside a Git LFS pointer where the network should be (a clone without LFS)."""
    shutil.copytree(model_dir, folder)
    (folder / "model.tflite").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 3401176\n"
    )
    return folder


@pytest.mark.services
@pytest.mark.parametrize("start", ["cxr-screen", "celery"])
def test_a_worker_whose_model_does_not_load_does_not_start(
    start: str, model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    """It said "ready", took every message and failed it; Celery dropped each one (no
    acknowledgement on failure) and the studies stayed queued with no message left."""
    model = broken_model(model_dir, tmp_path / "model")
    env = worker_env(IDLE_BROKER, sqlite_url, model)
    if start == "cxr-screen":
        done = python_module("worker", "worker", "--concurrency", "1", env=env)
    else:
        plain = ("-A", "worker.celery_app", "worker", "--without-mingle", "--without-gossip")
        done = python_module("celery", *plain, "--concurrency", "1", env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{model / 'model.tflite'} is not a TFLite model" in done.stderr
    if start == "cxr-screen":
        assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) <= 2


@pytest.mark.services
def test_the_worker_refuses_a_database_that_cannot_work_and_waits_for_one_that_is_down(
    postgres_url: str, tmp_path: Path
) -> None:
    """A database that does not exist was "unavailable": the worker started and retried
    every study for ever. One that is down is waited for, as before."""
    from db.session import DatabaseError, prepare_database

    assert prepare_database(postgres_url) is None
    missing = POSTGRES_URL.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(DatabaseError, match=r'/no_such_database: .*FATAL: .*"no_such_database'):
        prepare_database(missing)
    with pytest.raises(DatabaseError, match="invalid database URL"):
        prepare_database("postgresq+psycopg://postgres@127.0.0.1/test")
    down = prepare_database("postgresql+psycopg://postgres@127.0.0.1:1/test")
    assert down is not None and "Connection refused" in down
    # SQLite in a folder that is not there: "unable to open database file", for ever
    with pytest.raises(DatabaseError, match="no folder /nonexistent-dir for the SQLite"):
        prepare_database("sqlite:////nonexistent-dir/results.db")
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    with pytest.raises(DatabaseError, match="file is not a database"):
        prepare_database(f"sqlite:///{tmp_path / 'notes.db'}")


def test_status_failed_lists_failed_studies_and_screened_ones_with_failed_files(
    model_dir: Path, sqlite_url: str, dicom_dir: Path
) -> None:
    """A study whose new films failed stays `screened` (its earlier result stands): the
    listing showed only `failed` studies, so nobody saw the films without a result."""
    from db.repository import mark_failed, queue_studies

    run([dicom_dir / "cxr"], Settings(database_url=sqlite_url, model=model_dir, workers=1))
    first, second, *_ = (
        uid for (uid,) in rows(sqlite_url, "SELECT study_instance_uid FROM studies ORDER BY 1")
    )
    version = read_card(model_dir).model_version
    with open_database(sqlite_url).begin() as session:  # screened again, and failed
        queue_studies(session, [{"study_instance_uid": first, "files": []}], version, force=True)
        mark_failed(session, first, version, "OperationalError: db down")
    with open_database(sqlite_url).begin() as session:
        session.execute(
            text("UPDATE studies SET n_failed = 1 WHERE study_instance_uid = :uid"), {"uid": second}
        )
    done = python_module(
        "worker", "status", "--failed", env=worker_env(IDLE_BROKER, sqlite_url, model_dir)
    )
    assert done.returncode == 0, done.stderr
    assert "studies with failed files (2)" in done.stdout
    listed = {
        line.split("│")[1].strip(): line for line in done.stdout.splitlines() if "│ 1." in line
    }
    assert set(listed) == {first, second}
    assert "failed" in listed[first] and "OperationalError: db down" in listed[first]
    assert "screened" in listed[second] and "1 of 1" in listed[second]
