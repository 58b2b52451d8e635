"""The distributed commands as a person runs them: ``cxr-screen worker`` and ``requeue``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.worker.processes import Worker, wait_for
from tests.worker.test_faults import worker_env

# Its own Redis database: this worker must not take messages other tests queue.
IDLE_BROKER = REDIS_URL.rsplit("/", 1)[0] + "/12"


@pytest.mark.services
def test_worker_loglevel_overrides_the_configured_level(
    model_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    env = worker_env(IDLE_BROKER, sqlite_url, model_dir, log_level="INFO")
    command = ["worker", "worker", "--concurrency", "1", "--loglevel", "DEBUG"]
    worker = Worker(env, tmp_path / "worker.log", command=command)
    try:
        wait_for(lambda: " ready." in worker.log(), 60, "the worker to be ready")
        # Logged after Celery has set up logging (the flag was applied before that).
        assert "DEBUG celery.bootsteps" in worker.log(), worker.log()[-3000:]
    finally:
        worker.stop()
