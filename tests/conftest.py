"""Shared test fixtures: the shared data folder, the shipped model, databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from config.settings import DEFAULT_MODEL, REPO_ROOT

SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
POSTGRES_URL = os.environ.get(
    "CXR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CXR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def shared(*parts: str) -> Path:
    """A path under ../shared/data; the test is skipped, saying why, when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set CXR_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    return shared("dicom", "zoo")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return shared("dicom")


@pytest.fixture(scope="session")
def cxr_dir() -> Path:
    return shared("cxr")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    path = Path(os.environ.get("CXR_TEST_MODEL", DEFAULT_MODEL))
    assert (path / "model_card.json").is_file(), f"the shipped model is missing at {path}"
    return path


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'results.db'}"


SERVICE_FIXTURES = frozenset({"postgres_url", "broker"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``services`` follows the fixtures: a test that reaches the real PostgreSQL or Redis
    is marked whether or not its author remembered (29 were not)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgres = callspec is not None and callspec.params.get("database_url") == "postgresql"
        if on_postgres or SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture()
def postgres_url() -> Iterator[str]:
    """A fresh schema-less database on the real PostgreSQL, dropped afterwards."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"cxr_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - environment problem, not a test result
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def broker() -> Iterator[str]:
    """The test Redis database, emptied before and after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
    else:
        yield request.getfixturevalue("postgres_url")
