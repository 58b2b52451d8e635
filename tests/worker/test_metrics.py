"""Prometheus metrics scraped over HTTP from a running worker, and log hygiene."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_URL
from tests.worker.processes import Worker, port_open, wait_for
from tests.worker.test_faults import all_final, ingest, worker_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float:
    """The sum of a metric's samples whose line starts with ``name``."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert values, f"{name} not in the scrape"
    return sum(values)


@pytest.mark.services
@pytest.mark.slow
def test_worker_serves_metrics_and_json_logs_without_patient_data(
    postgres_url: str, dicom_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    port = free_port()
    env = {
        **worker_env(REDIS_URL, postgres_url, model_dir),
        "CXR_METRICS_PORT": str(port),
        "CXR_LOG_JSON": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    (tmp_path / "prom").mkdir()
    out = ingest(dicom_dir / "cxr", env)
    n = int(out.split("queued ")[1].split()[0])
    worker = Worker(env, tmp_path / "worker.log", concurrency=2)
    try:
        wait_for(lambda: port_open(port), 60, "the metrics port")
        wait_for(lambda: all_final(postgres_url, n), 120, "every study")
        text = scrape(port)
        print(f"metrics: {n} studies; scrape of {len(text)} bytes")
    finally:
        worker.stop()
        client.flushdb()
        client.close()
    assert sample(text, 'cxr_studies_total{outcome="screened"}') == n
    assert sample(text, 'cxr_images_total{outcome="screened"}') >= n
    for histogram in (
        "cxr_decode_seconds_count",
        "cxr_inference_seconds_count",
        "cxr_db_write_seconds_count",
    ):
        assert sample(text, histogram) >= n
    assert "cxr_model_info{model_version=" in text
    assert sample(text, "cxr_broker_queue_depth") == 0
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert log.count('"study_instance_uid"') >= n
    assert "Covid0000" not in log  # the NIH file's PatientID
    assert "CXR_HASH_KEY is the published default" in log, "the default hash key is named"
