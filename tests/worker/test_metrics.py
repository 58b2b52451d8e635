"""Prometheus metrics scraped over HTTP from a running worker, and log hygiene."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.conftest import REDIS_URL
from tests.worker.processes import Worker, free_port, port_open, wait_for
from tests.worker.test_faults import all_final, ingest, worker_env
from worker.celery_app import QUEUE, SCREEN_TASK


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def samples(text: str, name: str) -> list[float]:
    """The values of a metric's samples whose line starts with ``name``."""
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]


def sample(text: str, name: str) -> float:
    values = samples(text, name)
    assert values, f"{name} not in the scrape"
    return sum(values)


def queue_depth_with_messages_held(port: int, count: int) -> float:
    """The gauge with ``count`` messages waiting: the worker stops taking from the queue
    (a remote-control command, as an operator would pause it) and they stay there."""
    control = Celery(broker=REDIS_URL)
    try:
        assert control.control.cancel_consumer(QUEUE, reply=True, limit=1, timeout=10)
        # The worker answers before it stops consuming: wait until it says it has.
        wait_for(lambda: not consuming(control), 10, "the worker to leave the queue")
        for _ in range(count):
            control.send_task(SCREEN_TASK, queue=QUEUE)
        return sample(scrape(port), "cxr_broker_queue_depth")
    finally:
        control.close()


def consuming(control: Celery) -> bool:
    queues = control.control.inspect(timeout=1, limit=1).active_queues() or {}
    assert queues, "the worker did not answer"
    return any(q["name"] == QUEUE for worker in queues.values() for q in worker)


@pytest.mark.services
@pytest.mark.slow
def test_worker_serves_metrics_and_json_logs_without_patient_data(
    postgres_url: str, dicom_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    """At DEBUG too: Celery's pool logged each message's file paths, and export folders
    are often named after the patient. The metrics folder need not exist beforehand."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    port = free_port()
    env = {
        **worker_env(REDIS_URL, postgres_url, model_dir, log_level="DEBUG"),
        "CXR_METRICS_PORT": str(port),
        "CXR_LOG_JSON": "true",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
    }
    export = tmp_path / "DOE^JOHN_MRN1234567"
    export.mkdir()
    for i, dicom in enumerate(sorted((dicom_dir / "cxr").glob("*.dcm"))):
        shutil.copy(dicom, export / f"DOE_JOHN_MRN1234567_chest_{i}.dcm")
    out = ingest(export, env)
    n = int(out.split("queued ")[1].split()[0])
    worker = Worker(env, tmp_path / "worker.log", concurrency=2)
    try:
        wait_for(lambda: port_open(port), 60, "the metrics port")
        wait_for(lambda: all_final(postgres_url, n), 120, "every study")
        # counted just after the commit that made the study final
        screened = 'cxr_studies_total{outcome="screened"}'
        wait_for(lambda: sum(samples(scrape(port), screened)) >= n, 30, "the last study counted")
        text = scrape(port)
        print(f"metrics: {n} studies; scrape of {len(text)} bytes")
        waiting = queue_depth_with_messages_held(port, 3)
    finally:
        worker.stop()
        client.flushdb()
        client.close()
    assert sample(text, screened) == n
    assert sample(text, 'cxr_images_total{outcome="screened"}') >= n
    for histogram in (
        "cxr_decode_seconds_count",
        "cxr_inference_seconds_count",
        "cxr_db_write_seconds_count",
    ):
        assert sample(text, histogram) >= n
    assert "cxr_model_info{model_version=" in text
    assert sample(text, "cxr_broker_queue_depth") == 0
    assert waiting == 3
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert log.count('"study_instance_uid"') >= n
    assert "Covid0000" not in log  # the NIH file's PatientID
    assert '"level": "DEBUG"' in log and "MRN1234567" not in log
    assert "CXR_HASH_KEY is the published default" in log, "the default hash key is named"


@pytest.mark.services
def test_a_metrics_port_in_use_stops_the_worker_with_one_line(
    sqlite_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """Celery logged the bind error as a traceback and ran on with no metrics: a second
    worker on the host, same port, and no scrape target for it."""
    port = free_port()
    env = {**worker_env(REDIS_URL, sqlite_url, model_dir), "CXR_METRICS_PORT": str(port)}
    with socket.create_server(("0.0.0.0", port)):
        worker = Worker(env, tmp_path / "worker.log")
        try:
            worker.process.wait(timeout=60)
            log = worker.log()
        finally:
            worker.stop()
    assert worker.process.returncode == 2, log[-3000:]
    assert f"the worker cannot start: CXR_METRICS_PORT {port}: Address already in use" in log
    assert "Traceback" not in log


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pool_processes_count_together_when_prometheus_client_came_first(
    tmp_path: Path,
) -> None:
    """Flower's Celery plugin imports prometheus_client before the worker starts, in
    single-process mode: each pool process counted for itself and /metrics showed no
    study counter (the test worker, given PROMETHEUS_MULTIPROC_DIR, never saw it)."""
    folder = tmp_path / "prom"
    code = (
        "import os, sys\n"
        "import prometheus_client\n"
        "from worker.metrics import prepare_multiprocess, metrics\n"
        f"os.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(folder)!r}\n"
        "prepare_multiprocess()\n"
        "if os.fork() == 0:\n"
        "    metrics().studies.labels(outcome='screened').inc()\n"
        "    os._exit(0)\n"
        "os.wait()\n"
        "from prometheus_client import CollectorRegistry\n"
        "from prometheus_client.multiprocess import MultiProcessCollector\n"
        "registry = CollectorRegistry()\n"
        "MultiProcessCollector(registry)\n"
        "print(registry.get_sample_value('cxr_studies_total', {'outcome': 'screened'}))\n"
    )
    done = run_python(code, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1.0"


def test_metrics_that_cannot_be_kept_never_fail_a_study(tmp_path: Path) -> None:
    """A PROMETHEUS_MULTIPROC_DIR that does not exist failed every study: FileNotFoundError,
    then DuplicateTimeseries from the half-registered counters."""
    code = (
        "from worker.metrics import metrics\n"
        "from worker.screening import failed_outcome\n"
        "outcome = failed_outcome('1.2.3', ['/x/1.dcm'], 'm-1', 'test', {})\n"
        "for _ in range(2):\n"
        "    metrics().observe(outcome)\n"
        "    with metrics().timing_db_write():\n"
        "        pass\n"
        "print(type(metrics()).__name__)\n"
    )
    done = run_python(code, {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "MetricsOff"
    assert "metrics are off in this process: FileNotFoundError" in done.stderr
