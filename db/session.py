"""Engines, schema upgrades and sessions."""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
RESULT_TABLES = frozenset({"studies", "predictions"})
REVISION_ID = r"\d{4}"  # how cxr-screen's migrations are numbered (0001_results_tables.py)
LOCK_SUFFIX = ".lock"  # the upgrade lock beside a SQLite file
# Several workers may start at once: PostgreSQL serialises their upgrades on this
# advisory lock (migrations/env.py), SQLite on the lock file, taken before connecting.
MIGRATION_LOCK_ID = 7_421_035
# How long a PostgreSQL upgrade waits for a table another session holds (an analyst's
# open transaction) before it gives up and rolls back: waiting, it held the tables it had
# already changed, so every reader queued behind it.
UPGRADE_LOCK_TIMEOUT_MS = 30_000
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout
UNENCODED_AT = (
    "invalid database URL: an '@' in the user name or password must be percent-encoded "
    "(@ as %40), or the rest of the password is read as the host"
)


class DatabaseError(Exception):
    """The results database cannot be reached or upgraded."""


def make_engine(url: str) -> Engine:
    # No pool_pre_ping: it costs a round trip per transaction. A connection that died
    # with the server fails its next statement as "invalidated", which callers treat as
    # transient (the worker retries the study), and the pool replaces it.
    # hide_parameters: error messages end up in logs and `studies.reason`, and a
    # statement's parameters are patient data (accession numbers, patient references).
    if has_unencoded_at(url):
        # The password's end would be read as the host or port, echoed by every message.
        raise DatabaseError(UNENCODED_AT)
    try:
        engine = create_engine(url, hide_parameters=True)
    except (ArgumentError, ImportError, ValueError) as exc:
        raise DatabaseError(f"invalid database URL {safe_url(url)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        if engine.url.database in (None, "", ":memory:"):
            # `sqlite:///$DBFILE` with the variable unset: screened, reported, thrown away
            raise DatabaseError(
                f"{safe_url(url)} is an in-memory database, which keeps no results: "
                "name a file (sqlite:///path/to/results.db)"
            )
        if engine.url.query.get("uri") is not None:
            # the lock and the private file are made beside the path, which a URI is not
            raise DatabaseError(
                f"{safe_url(url)}: SQLite URI filenames (the uri parameter) are not supported: "
                "name a file (sqlite:///path/to/results.db)"
            )
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# PostgreSQL: connection errors, shut down or starting up, too many connections,
# serialization failure, deadlock, lock not available.
UNAVAILABLE_SQLSTATES = ("08", "57P", "53300", "40001", "40P01", "55P03")
UNAVAILABLE_SQLITE_ERRORS = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN")


def is_database_unavailable(exc: BaseException | None) -> bool:
    """The database could not be reached (or set up), lost the connection, or was busy,
    locked or deadlocked: nothing about the study. Recording it ``failed`` needs the
    same database, and once that works screening it does too. Not a statement timeout
    or a missing table: those are errors like any other."""
    if isinstance(exc, DatabaseError):
        return is_database_unavailable(exc.__cause__)
    if isinstance(exc, InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return True
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", "")  # PostgreSQL's; None: no answer at all
    sqlite_error = getattr(exc.orig, "sqlite_errorname", "")
    return (
        sqlstate is None
        or str(sqlstate).startswith(UNAVAILABLE_SQLSTATES)
        or sqlite_error.startswith(UNAVAILABLE_SQLITE_ERRORS)
    )


# Said by a server that refuses a connection for now, not for good. libpq gives no
# SQLSTATE for a failed connection, only its message.
TRANSIENT_REFUSALS = ("starting up", "shutting down", "in recovery", "too many", "slots")


def prepare_database(url: str) -> str | None:
    """Bring the schema up to date before a worker's pool processes start, so that they
    do not each upgrade on their first study, one behind another, each holding the
    tables it has changed for up to the lock timeout.

    None when done, or why the database cannot be reached now (a retry may succeed).
    DatabaseError when it cannot work at all: a URL that does not parse, a server that
    refused the database, role or password for good, a SQLite file in a folder that
    does not exist or that is not a database, a schema this cxr-screen does not know, or
    an upgrade another session is in the way of."""
    engine = make_engine(url)
    try:
        upgrade(engine)
        return None
    except DatabaseError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OperationalError) or _is_lock_timeout(cause):
            raise
        message = first_line(cause)
        if "FATAL:" in message and not any(t in message for t in TRANSIENT_REFUSALS):
            raise DatabaseError(f"cannot connect to {safe_url(url)}: {message}") from None
        return message
    finally:
        engine.dispose()


def first_line(exc: BaseException) -> str:
    """The driver's message, first line only: the rest can quote a statement's values."""
    message = str(getattr(exc, "orig", None) or exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from many processes. A database
    already there is only read: the upgrade takes SQLite's write lock, which would make
    every command wait for (and after 30 s fail on) a transaction another program holds
    open."""
    try:
        if _is_already_at(engine, revision):
            return
        with sqlite_upgrade_lock(engine):
            # Read again under the lock: another process may have upgraded meanwhile,
            # and a SQLite file not in WAL mode is read only now.
            if is_at(engine, revision):
                return
            with engine.connect() as connection:
                # The migrations run on this connection; the URL never goes through
                # Alembic's configparser, which reads the "%" of a percent-encoded path
                # as interpolation.
                config = migrations_config()
                config.attributes["connection"] = connection
                config.attributes["lock_timeout_ms"] = UPGRADE_LOCK_TIMEOUT_MS
                command.upgrade(config, revision)
                connection.commit()
    except DatabaseError:
        raise
    except Exception as exc:
        where = safe_url(str(engine.url))
        if _is_lock_timeout(exc):
            raise DatabaseError(
                f"cannot upgrade database {where}: another session holds a table the upgrade "
                f"changes (an open transaction: a report, an analyst's query) and it waited "
                f"{UPGRADE_LOCK_TIMEOUT_MS / 1000:g} s; nothing was changed. Try again once "
                "that session has ended"
            ) from exc
        raise DatabaseError(f"cannot upgrade database {where}: {first_line(exc)}") from exc


def _is_lock_timeout(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) == LOCK_NOT_AVAILABLE


def migrations_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def schema_state(engine: Engine) -> tuple[str | None, set[str]]:
    """The schema revision (None where there is none) and the table names; a plain read.
    The tables are read first: an upgrade commits its tables and its revision at once,
    so tables seen before another process's commit never meet that commit's revision."""
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        return MigrationContext.configure(connection).get_current_revision(), tables


def is_at(engine: Engine, revision: str) -> bool:
    """Whether the schema is at ``revision`` already (see ``known_revision``)."""
    scripts = ScriptDirectory.from_config(migrations_config())
    return known_revision(engine) == scripts.as_revision_number(revision)


def known_revision(engine: Engine) -> str | None:
    """The schema's revision, None for a database without cxr-screen's tables.
    DatabaseError where no upgrade can help ("Can't locate revision" and "table already
    exists" told nobody what to do): a revision a newer cxr-screen wrote, another
    application's Alembic history, or cxr-screen's tables without their revision."""
    where = safe_url(str(engine.url))
    current, tables = schema_state(engine)
    scripts = ScriptDirectory.from_config(migrations_config())
    if current is None:
        if found := sorted(tables & RESULT_TABLES):
            raise DatabaseError(
                f"{where} has tables named {', '.join(found)} but no schema revision (a "
                "copy restored without its alembic_version table, or another "
                "application's tables): give cxr-screen a database of its own, or restore "
                "alembic_version with the tables"
            )
        return None
    if current in {s.revision for s in scripts.walk_revisions()}:
        return current
    if not re.fullmatch(REVISION_ID, current):
        raise DatabaseError(
            f"the schema of {where} is at revision {current}, which is not a cxr-screen "
            "revision: the database holds another application's schema history; give "
            "cxr-screen a database of its own"
        )
    raise DatabaseError(
        f"the schema of {where} is at revision {current}, which this cxr-screen does not "
        f"know (its newest is {scripts.get_current_head()}): a newer cxr-screen wrote it; "
        "upgrade this one"
    )


def _is_already_at(engine: Engine, revision: str) -> bool:
    """``is_at`` without the lock, where a read cannot get in another process's way: a
    SQLite file is read so only once it is in WAL mode (a reader's lock made the first
    process's switch to WAL fail with "database is locked"); a busy database is asked
    again under the lock."""
    if _sqlite_before_wal(engine):
        return False
    try:
        return is_at(engine, revision)
    except (OperationalError, sqlite3.Error):
        return False


def _sqlite_before_wal(engine: Engine) -> bool:
    """A SQLite file not made yet or not yet in WAL mode: only the upgrade lock's holder
    may open it (opening switches it to WAL)."""
    return engine.dialect.name == "sqlite" and not _in_wal_mode(Path(engine.url.database or ""))


def _in_wal_mode(path: Path) -> bool:
    """From the file header (bytes 18-19 are 2 in WAL mode), without opening SQLite."""
    try:
        with path.open("rb") as stream:
            header = stream.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18] == header[19] == 2


@contextmanager
def sqlite_upgrade_lock(engine: Engine) -> Iterator[None]:
    """One process at a time opens and upgrades a SQLite file: on a new file, two found
    no tables and one died on "table already exists", or on "database is locked"
    switching the file to WAL. The lock is a file beside the database, ``<file>.lock``.
    PostgreSQL serialises the migrations on an advisory lock instead
    (``migrations/env.py``)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    check_sqlite_folder(engine)
    with open(database + LOCK_SUFFIX, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        create_private(Path(database))
        yield


def has_unencoded_at(url: str) -> bool:
    """More than one "@" before the path: a user name or password with an "@" that is not
    written %40."""
    authority = url.partition("://")[2].partition("/")[0]
    return authority.count("@") > 1


def check_sqlite_folder(engine: Engine) -> None:
    """DatabaseError naming the folder when the SQLite file's folder does not exist (the
    error was about the lock file beside it)."""
    folder = Path(engine.url.database or "").parent
    if not folder.is_dir():
        raise DatabaseError(
            f"no folder {folder} for the SQLite database {safe_url(str(engine.url))}"
        )


def create_private(path: Path) -> None:
    """A new SQLite file readable by its owner only: it holds file paths, which often
    name the patient, and accession numbers. SQLite gives its WAL files the same mode."""
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def open_database(url: str) -> sessionmaker[Session]:
    """An upgraded database, ready for sessions."""
    engine = make_engine(url)
    upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def autocommit(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session in which each statement commits on its own, for single-statement
    writes: no BEGIN and COMMIT round trips around it."""
    with sessions() as session:
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session


def database_files(url: str) -> list[str]:
    """The files of a SQLite database - itself, its journal, WAL, shared memory and the
    upgrade lock - which a run of the folder holding them took for rejected films."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return []
    suffixes = ("", "-wal", "-shm", "-journal", LOCK_SUFFIX)
    return [parsed.database + suffix for suffix in suffixes]


def safe_url(url: str) -> str:
    """The URL without its password (libpq also takes ``?password=``), for messages,
    logs and reports."""
    if has_unencoded_at(url):
        return "<URL with an unencoded @>"
    try:
        parsed = make_url(url)
        secrets = [key for key in parsed.query if "password" in key.lower()]
        rendered = parsed.difference_update_query(secrets).render_as_string(hide_password=True)
        return unquote(rendered)  # the path as typed: "a:b.db", not "a%3Ab.db"
    except Exception:
        return "<unparseable URL>"
