"""Reading and writing a test database by URL: each call opens and disposes its own
engine, so a helper never holds a connection a worker process or a test needs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, create_engine, text


@contextmanager
def connection(url: str, *, transaction: bool = False) -> Iterator[Connection]:
    engine = create_engine(url)
    try:
        with engine.begin() if transaction else engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def rows(url: str, query: str, timezone: str | None = None) -> list[tuple[Any, ...]]:
    with connection(url) as conn:
        if timezone:
            conn.execute(text(f"SET TIME ZONE '{timezone}'"))
        return [tuple(r) for r in conn.execute(text(query))]


def scalar(url: str, query: str) -> Any:
    with connection(url) as conn:
        return conn.execute(text(query)).scalar()


def execute(url: str, statement: str) -> None:
    with connection(url, transaction=True) as conn:
        conn.execute(text(statement))
