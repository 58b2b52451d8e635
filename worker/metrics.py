"""Prometheus metrics of a worker.

Celery's prefork children each count in their own process, so the metrics use
prometheus_client's multiprocess mode: every process writes to files in
``PROMETHEUS_MULTIPROC_DIR`` and the HTTP endpoint in the parent aggregates them.
``prepare_multiprocess`` must run before ``prometheus_client`` is first imported.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.screening import StudyOutcome

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def prepare_multiprocess() -> Path:
    """Point prometheus_client at a fresh directory shared by this worker's processes.

    Celery's command line may have imported prometheus_client already (Flower's plugin
    does), in single-process mode: the value class is chosen again here, or the pool
    processes would count for themselves only."""
    from prometheus_client import values

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder is None:
        folder = tempfile.mkdtemp(prefix="cxr-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    Path(folder).mkdir(parents=True, exist_ok=True)
    for stale in Path(folder).glob("*.db"):
        stale.unlink()
    values.ValueClass = values.get_value_class()
    return Path(folder)


class Metrics:
    """The worker's metrics; created once per process."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.studies = Counter("cxr_studies_total", "Studies processed, by outcome", ["outcome"])
        self.images = Counter("cxr_images_total", "Instances processed, by outcome", ["outcome"])
        self.decode = Histogram(
            "cxr_decode_seconds", "Read, decode and normalise one image", buckets=LATENCY_BUCKETS
        )
        self.inference = Histogram(
            "cxr_inference_seconds", "Inference per image", buckets=LATENCY_BUCKETS
        )
        self.db_write = Histogram(
            "cxr_db_write_seconds",
            "Writing one message's rows (all its studies, one transaction)",
            buckets=LATENCY_BUCKETS,
        )
        self.model = Gauge(
            "cxr_model_info", "Model version served", ["model_version"], multiprocess_mode="max"
        )

    def observe(self, outcome: StudyOutcome) -> None:
        with best_effort():
            self._observe(outcome)

    def _observe(self, outcome: StudyOutcome) -> None:
        self.studies.labels(outcome=outcome.status.value).inc()
        self.model.labels(model_version=outcome.model_version).set(1)
        for result in outcome.instances:
            self.images.labels(outcome=result.status.value).inc()
            if result.decode_ms is not None:
                self.decode.observe(result.decode_ms / 1000)
            if result.inference_ms is not None:
                self.inference.observe(result.inference_ms / 1000)

    @contextmanager
    def timing_db_write(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        with best_effort():
            self.db_write.observe(time.perf_counter() - start)


class MetricsOff(Metrics):
    """What a process counts when its metrics cannot be kept: nothing."""

    def __init__(self) -> None:
        pass

    def observe(self, outcome: StudyOutcome) -> None:
        pass

    @contextmanager
    def timing_db_write(self) -> Iterator[None]:
        yield


@contextmanager
def best_effort() -> Iterator[None]:
    """Metrics never fail a study (a metrics folder removed by a /tmp cleaner, a full disk)."""
    try:
        yield
    except Exception as exc:
        log.warning("metrics not updated: %s: %s", type(exc).__name__, exc)


_metrics: Metrics | None = None


def metrics() -> Metrics:
    global _metrics
    if _metrics is None:
        try:
            _metrics = Metrics()
        except Exception as exc:  # PROMETHEUS_MULTIPROC_DIR missing or not writable
            log.warning("metrics are off in this process: %s: %s", type(exc).__name__, exc)
            _metrics = MetricsOff()
    return _metrics


def serve(port: int, queue_depth: Callable[[], int] | None = None) -> None:
    """Serve the aggregated metrics of all this worker's processes on ``port``."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    if queue_depth is not None:
        registry.register(_QueueDepthCollector(queue_depth))
    start_http_server(port, registry=registry)


class _QueueDepthCollector:
    """Reads the queue length at scrape time, from the parent process."""

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            depth = float(self._read())
        except Exception:
            depth = float("nan")
        yield GaugeMetricFamily(
            "cxr_broker_queue_depth", "Messages waiting in the queue", value=depth
        )
