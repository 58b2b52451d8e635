"""The schema on both databases: migrations, unique keys and upserts."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import sqlite3
import threading
import uuid
from dataclasses import replace
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from db.models import Base, Prediction, Study
from db.repository import save_instances, save_study
from db.session import (
    MIGRATION_LOCK_ID,
    DatabaseError,
    make_engine,
    open_database,
    prepare_database,
    upgrade,
)
from tests.conftest import POSTGRES_URL
from tests.sql import connection, execute, rows
from worker.imaging.dicom import InstanceHeader
from worker.imaging.enum import Label, Status
from worker.reporting import open_results
from worker.screening import InstanceResult, StudyOutcome, rejected

HEADER = InstanceHeader(
    sop_instance_uid="1.2.3.4.1",
    series_instance_uid="1.2.3.4",
    study_instance_uid="1.2.3",
    accession_number="A1",
    study_date=dt.date(2026, 11, 26),
    patient_id="PID-1",
    modality="DX",
    view_position="PA",
)


def outcome(probability: float) -> StudyOutcome:
    now = dt.datetime.now(dt.UTC)
    screened = InstanceResult(
        source="/x/1.dcm",
        status=Status.SCREENED,
        header=HEADER,
        covid_probability=probability,
        predicted_label=Label.COVID if probability >= 0.5 else Label.NORMAL,
    )
    return StudyOutcome("1.2.3", (screened,), "m-1", 0.5, now, now, HEADER)


@pytest.mark.services
def test_migrations_are_repeatable(database_url: str) -> None:
    engine = make_engine(database_url)
    upgrade(engine)
    upgrade(engine)
    engine.dispose()


def test_the_migrated_schema_is_the_models_and_indexes_every_period_filter(
    database_url: str,
) -> None:
    """Reports and exports select a period by these timestamps: without an index each
    scanned the whole table."""
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    indexed = {
        (table, tuple(index["column_names"]))
        for table in ("studies", "predictions")
        for index in inspect(engine).get_indexes(table)
    }
    engine.dispose()
    periods = {
        ("studies", ("finished_at",)),
        ("studies", ("queued_at",)),
        ("predictions", ("updated_at",)),
    }
    assert periods <= indexed


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM studies WHERE status IN ('screened', 'rejected', 'failed') "
        "AND finished_at >= '2025-06-01' AND finished_at < '2025-06-02'",  # export, report
        "SELECT * FROM positive_studies WHERE finished_at >= '2025-06-01 00:00:00+00'",
    ],
)
def test_sqlite_finds_a_period_of_finished_studies_by_its_bounds(
    tmp_path: Path, query: str
) -> None:
    """SQLite has no statistics unless ANALYZE runs: it took the index on status alone,
    which matches nearly every row, and read the whole table for one day."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    open_database(url).kw["bind"].dispose()
    plan = " ".join(str(row[-1]) for row in rows(url, f"EXPLAIN QUERY PLAN {query}"))
    assert "finished_at>?" in plan, plan


def _first_use(url: str, start: Barrier, results: Any) -> None:
    start.wait()
    try:
        open_database(url)
        results.put("ok")
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}"[:300])


def open_together(url: str, n: int) -> list[str]:
    """``n`` processes open the database at once (each runs the migrations); the errors."""
    context = multiprocessing.get_context("fork")
    start, results = context.Barrier(n), context.SimpleQueue()
    processes = [context.Process(target=_first_use, args=(url, start, results)) for _ in range(n)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    return [out for out in (results.get() for _ in range(n)) if out != "ok"]


def test_row_ids_on_postgresql_are_64_bit_with_rows_kept(postgres_url: str) -> None:
    """An upsert uses up a sequence value even when it only updates (three per study
    through a worker): a 32-bit sequence runs out, and then every save fails."""
    engine = make_engine(postgres_url)
    upgrade(engine, "0004")
    execute(
        postgres_url,
        "INSERT INTO studies (study_instance_uid, model_version, status, n_instances, "
        "n_screened, n_rejected, n_failed, attempts) "
        "VALUES ('1.2.3', 'm', 'queued', 0, 0, 0, 0, 0)",
    )
    upgrade(engine)
    types = rows(
        postgres_url,
        "SELECT sequencename, data_type FROM pg_sequences ORDER BY 1",
    ) + rows(
        postgres_url,
        "SELECT table_name, data_type FROM information_schema.columns "
        "WHERE column_name = 'id' AND table_schema = 'public' ORDER BY 1",
    )
    assert types == [
        ("predictions_id_seq", "bigint"),
        ("studies_id_seq", "bigint"),
        ("predictions", "bigint"),
        ("studies", "bigint"),
    ]
    assert rows(postgres_url, "SELECT study_instance_uid FROM studies") == [("1.2.3",)]
    engine.dispose()


@pytest.mark.services
def test_workers_starting_together_on_a_fresh_postgresql_all_get_the_schema() -> None:
    """Eight processes open a new database at once, twelve times over (each process
    also runs the migrations): every one must come up."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    failures = []
    try:
        for _ in range(12):
            name = f"cxr_test_{uuid.uuid4().hex[:10]}"
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            failures += open_together(POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}", 8)
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
    assert failures == []


def test_processes_starting_together_on_a_new_sqlite_file_all_get_the_schema(
    tmp_path: Path,
) -> None:
    """Two ingests, two runs, or ingest and ``db upgrade`` on a file that is not there."""
    failures = []
    for attempt in range(12):
        failures += open_together(f"sqlite:///{tmp_path / f'results-{attempt}.db'}", 4)
    assert failures == []


def test_a_migration_that_fails_leaves_no_half_schema(database_url: str) -> None:
    """A failed (or killed) upgrade must leave the database as it was: a half-made
    schema with no recorded revision fails every later start on "already exists"."""
    execute(database_url, "CREATE TABLE daily_summary (x integer)")  # in 0002's way
    with pytest.raises(DatabaseError, match="already exists"):
        open_database(database_url)
    tables = "SELECT name FROM sqlite_master WHERE type = 'table'"
    if database_url.startswith("postgresql"):
        tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    assert rows(database_url, tables) == [("daily_summary",)]
    execute(database_url, "DROP TABLE daily_summary")
    open_database(database_url)


def test_a_pending_sqlite_upgrade_waits_for_a_concurrent_writer(tmp_path: Path) -> None:
    """Another process (a worker of the previous release, say) writes while the upgrade
    runs: the upgrade must wait for it, not fail on "database is locked"."""
    path = tmp_path / "results.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine, "0002")
    other = sqlite3.connect(path, timeout=0.2)
    wrote: list[bool] = []

    @event.listens_for(engine, "before_cursor_execute")
    def write_meanwhile(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("CREATE") and not wrote:
            try:  # before the migration's first DDL statement
                other.execute("CREATE TABLE written_meanwhile (x)")
                other.commit()
                wrote.append(True)
            except sqlite3.OperationalError:  # the upgrade holds the write lock: it waits
                wrote.append(False)

    upgrade(engine)
    other.close()
    assert wrote == [False], "the other writer got in before the upgrade's DDL"
    engine.dispose()


def test_a_database_at_the_newest_schema_is_opened_without_the_write_lock(
    tmp_path: Path,
) -> None:
    """Every command upgrades on start; it took SQLite's write lock also when there was
    nothing to do, so a SQLite browser with a write transaction open made `report` and
    `run` wait 30 s and fail."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    open_database(url).kw["bind"].dispose()
    holder = sqlite3.connect(tmp_path / "results.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    opened = threading.Event()

    def open_it() -> None:
        open_database(url).kw["bind"].dispose()
        opened.set()

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    try:
        assert opened.wait(5), "waited for another program's write transaction"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        thread.join()


def test_a_schema_newer_than_the_code_is_refused_with_what_to_do(database_url: str) -> None:
    open_database(database_url).kw["bind"].dispose()
    execute(database_url, "UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(DatabaseError, match=r"at revision 0099, which this cxr-screen does not"):
        open_database(database_url)


def test_a_sqlite_file_out_of_wal_mode_at_a_newer_schema_is_refused_with_what_to_do(
    tmp_path: Path,
) -> None:
    """A copy made by .backup or VACUUM INTO is in rollback-journal mode: the check that
    reads only WAL files let a worker start on it, and the upgrade failed on "Can't
    locate revision"."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    open_database(url).kw["bind"].dispose()
    execute(url, "UPDATE alembic_version SET version_num = '0099'")
    for attempt in (prepare_database, open_database):
        db = sqlite3.connect(tmp_path / "results.db")  # each attempt opens it in WAL mode
        assert db.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
        db.close()
        with pytest.raises(DatabaseError, match=r"at revision 0099, which this cxr-screen does"):
            attempt(url)


def test_another_applications_schema_history_is_named_as_such(database_url: str) -> None:
    execute(database_url, "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
    execute(database_url, "INSERT INTO alembic_version VALUES ('ae1027a6acf')")
    for attempt in (prepare_database, open_database):
        with pytest.raises(DatabaseError, match="not a cxr-screen revision"):
            attempt(database_url)


def test_result_tables_without_their_revision_are_refused_with_what_to_do(
    database_url: str,
) -> None:
    """A restore of the tables alone: reports said "no studies yet", the upgrade failed
    on "table already exists", and a worker started on it."""
    open_database(database_url).kw["bind"].dispose()
    execute(database_url, "DROP TABLE alembic_version")
    for attempt in (prepare_database, open_database, open_results):
        with pytest.raises(DatabaseError, match="studies but no schema revision"):
            attempt(database_url)


@pytest.mark.services
@pytest.mark.timeout(120)
def test_an_upgrade_behind_an_open_transaction_gives_up_and_changes_nothing(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for an analyst's transaction, the upgrade held the tables it had already
    changed, and every worker and report queued behind it for as long as it lasted."""
    engine = make_engine(postgres_url)
    upgrade(engine, "0004")  # 0005 changes both tables
    monkeypatch.setattr("db.session.UPGRADE_LOCK_TIMEOUT_MS", 500)
    try:
        with engine.connect() as analyst:
            analyst.execute(text("SELECT count(*) FROM studies"))  # a transaction left open
            # a worker's start-up upgrade too: not "down for now", to be retried by each
            # pool process in turn
            for attempt in (lambda: upgrade(engine), lambda: prepare_database(postgres_url)):
                with pytest.raises(DatabaseError, match="another session holds a table"):
                    attempt()
                assert rows(postgres_url, "SELECT count(*) FROM predictions") == [(0,)]
        assert rows(postgres_url, "SELECT version_num FROM alembic_version") == [("0004",)]
    finally:
        engine.dispose()


@pytest.mark.services
@pytest.mark.timeout(120)
def test_an_upgrade_waits_in_full_for_another_upgrade(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock timeout bounds waits for other sessions' tables, not the wait for the
    upgrade another process is running (set before the advisory lock, it failed every
    worker but the first of a fleet starting together)."""
    monkeypatch.setattr("db.session.UPGRADE_LOCK_TIMEOUT_MS", 200)
    with connection(postgres_url) as other:
        other.execute(text(f"SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
        releaser = threading.Timer(
            1.5, lambda: other.execute(text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
        )
        releaser.start()
        try:
            open_database(postgres_url).kw["bind"].dispose()
        finally:
            releaser.join()
    assert rows(postgres_url, "SELECT count(*) FROM studies") == [(0,)]


@pytest.mark.services
def test_upserts_keep_one_row_and_the_latest_values(database_url: str) -> None:
    sessions = open_database(database_url)
    for probability in (0.2, 0.9):
        with sessions.begin() as session:
            save_study(session, outcome(probability), patient_id_mode="hash", hash_key="k")
            save_instances(
                session, [rejected("/x/not.dcm", "unreadable", "not DICOM")], "m-1", None
            )
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 2
        study = session.scalars(select(Study)).one()
        assert (study.covid_probability, study.predicted_label) == (0.9, "covid")
        assert study.patient_ref not in (None, "PID-1")


@pytest.mark.services
def test_a_failed_duplicate_does_not_replace_a_screened_result(database_url: str) -> None:
    sessions = open_database(database_url)
    screened = outcome(0.9)
    failure = InstanceResult(
        "/x/1.dcm", Status.FAILED, HEADER, reason_code="error", reason="MemoryError: "
    )
    failed = replace(screened, instances=(failure,))
    for result in (screened, failed):
        with sessions.begin() as session:
            save_study(session, result, patient_id_mode="hash", hash_key="k")
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        row = session.scalars(select(Prediction)).one()
    assert (study.status, study.covid_probability, study.n_failed) == ("screened", 0.9, 0)
    assert (row.status, row.covid_probability) == ("screened", 0.9)


@pytest.mark.services
def test_a_study_with_no_screened_file_has_no_threshold(database_url: str) -> None:
    """As its files' rows and a failed study: a rejected study had the model's
    threshold beside no probability, and `export` wrote it."""
    sessions = open_database(database_url)
    lateral = rejected("/x/1.dcm", "not_frontal", "lateral", HEADER)
    with sessions.begin() as session:
        save_study(
            session,
            replace(outcome(0.9), instances=(lateral,)),
            patient_id_mode="hash",
            hash_key="k",
        )
    with sessions() as session:
        study = session.scalars(select(Study)).one()
    assert (study.status, study.covid_probability, study.threshold) == ("rejected", None, None)


@pytest.mark.services
def test_database_refuses_a_second_row_for_an_instance(database_url: str) -> None:
    sessions = open_database(database_url)
    now = dt.datetime.now(dt.UTC)
    row = dict(
        sop_instance_uid="9.9",
        status="screened",
        model_version="m-1",
        source="/a",
        created_at=now,
        updated_at=now,
    )
    with sessions.begin() as session:
        session.add(Prediction(**row))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Prediction(**{**row, "source": "/b"}))


def test_a_sqlite_file_in_a_folder_named_with_brackets_or_accents(tmp_path: Path) -> None:
    """Every command failed on "invalid interpolation syntax" (the percent-encoded path
    went through Alembic's configparser): a results file in "Reports (2024)" or under
    /home/Müller could not be opened."""
    folder = tmp_path / "Reports (2024) & Müller #1"
    folder.mkdir()
    sessions = open_database(f"sqlite:///{folder / 'results.db'}")
    with sessions() as session:
        assert session.execute(select(func.count()).select_from(Study)).scalar() == 0
    sessions.kw["bind"].dispose()


def test_messages_name_the_database_without_its_password() -> None:
    """A password given as libpq's ?password= reached reports, titles and errors."""
    from db.session import safe_url

    url = "postgresql+psycopg://cxr:s3cret@db:5432/cxr?password=hunter2&sslmode=require"
    assert safe_url(url) == "postgresql+psycopg://cxr:***@db:5432/cxr?sslmode=require"
    assert safe_url("postgresql+psycopg://db/cxr?sslpassword=k3y") == "postgresql+psycopg://db/cxr"
    assert safe_url("postgresql+psycopg://db:notaport/cxr") == "<unparseable URL>"
    assert safe_url("sqlite:////data/sp ace/a:b.db") == "sqlite:////data/sp ace/a:b.db"


def test_a_password_with_an_unencoded_at_sign_is_refused_and_never_shown() -> None:
    """``postgres:pa@ss@host``: the password's end became the host, shown in the message
    and in the driver's "failed to resolve host 'ss@host'"."""
    from db.session import safe_url

    url = "postgresql+psycopg://cxr:s3c@ret@db:5432/cxr"
    assert "ret" not in safe_url(url)
    with pytest.raises(DatabaseError, match="must be percent-encoded") as refused:
        make_engine(url)
    assert "ret" not in str(refused.value)
    assert safe_url(url.replace("c@r", "c%40r")) == "postgresql+psycopg://cxr:***@db:5432/cxr"
    port_like = "postgresql+psycopg://cxr:s3c@ret:part@db:5432/cxr"  # "ret" and "part" as port
    assert "part" not in safe_url(port_like)
    with pytest.raises(DatabaseError, match="must be percent-encoded"):
        make_engine(port_like)


def test_a_new_sqlite_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It was created 0644: file paths naming patients, readable by every local user."""
    database = tmp_path / "results.db"
    sessions = open_database(f"sqlite:///{database}")
    with sessions.begin() as session:
        session.execute(text("UPDATE studies SET status = status"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("results.db*")}
    sessions.kw["bind"].dispose()
    assert modes["results.db"] == 0o600 and modes.get("results.db-wal", 0o600) == 0o600, modes
