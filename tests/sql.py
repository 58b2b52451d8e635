"""Reading and writing a test database by URL: each call opens and disposes its own
engine, so a helper never holds a connection a worker process or a test needs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text


def rows(url: str, query: str, timezone: str | None = None) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if timezone:
                conn.execute(text(f"SET TIME ZONE '{timezone}'"))
            return [tuple(r) for r in conn.execute(text(query))]
    finally:
        engine.dispose()


def scalar(url: str, query: str) -> Any:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(query)).scalar()
    finally:
        engine.dispose()


def execute(url: str, statement: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()
