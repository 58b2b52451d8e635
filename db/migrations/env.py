"""Alembic environment: migrations run on SQLite and PostgreSQL alike."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from db.models import Base
from db.session import MIGRATION_LOCK_ID

config = context.config


def run_migrations_online() -> None:
    _run(config.attributes["connection"])  # given by db.session.upgrade


def _run(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # Held until the migrations' transaction ends: the next process reads the schema
        # only once the DDL is committed (a lock released before the commit let it see
        # no tables and create them a second time).
        connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})"))
        # Only after the advisory lock: another upgrade is waited for in full.
        timeout = int(config.attributes.get("lock_timeout_ms", 0))
        connection.execute(text(f"SET LOCAL lock_timeout = {timeout}"))
    elif connection.dialect.name == "sqlite":
        # pysqlite opens a transaction only before INSERT/UPDATE/DELETE, so each DDL
        # statement committed on its own: a failed or killed upgrade left half a schema
        # and no revision, and every later start failed on "table already exists".
        # IMMEDIATE takes the write lock now (waiting on busy_timeout): a deferred BEGIN
        # read the revision first, and a write by another process before the first DDL
        # then failed the upgrade at once with "database is locked".
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


run_migrations_online()
