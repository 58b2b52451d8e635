"""The Celery application, configured only from the one settings object (``config/``).

Start workers with ``cxr-screen worker`` or ``celery -A worker.celery_app worker``.
The settings below make delivery at-least-once; the upserts in ``db/repository.py``
make the results exactly-once. The README (Reliability) says why each one is set.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init

from config.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUE = "cxr-screen"
SCREEN_TASK = "cxr_screen.screen_study"
SCREEN_BATCH_TASK = "cxr_screen.screen_studies"


def soft_time_limit(settings: Settings) -> int:
    """The soft limit leaves the task time to record the study as failed."""
    limit = settings.task_time_limit
    return max(1, limit - max(1, min(30, limit // 10)))


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        # A message is acknowledged only after its results are committed, and handed
        # back to the queue when the process running it dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # A hard time limit does not acknowledge either: Celery 5.7 puts the message
        # straight back, and the delivery count (``attempts``) ends it as failed.
        "task_acks_on_failure_or_timeout": False,
        # One message reserved per process: a killed worker strands at most one study
        # per process, and a slow study does not hold others hostage.
        "worker_prefetch_multiplier": 1,
        # Redis redelivers a message not acknowledged within this time: it must exceed
        # the longest task (and the longest retry countdown).
        # Kombu sweeps for expired unacknowledged messages every interval x throttle
        # seconds (default about 100 s); a sweep is one cheap sorted-set query, so run
        # it every tenth of the visibility timeout (at most every minute).
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": max(1, min(60, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": soft_time_limit(settings),
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": QUEUE,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # keep trying while Redis restarts
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Recycle pool processes now and then (native decoders may leak).
        "worker_max_tasks_per_child": 500,
        "worker_send_task_events": False,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 10,
            "interval_start": 0.5,
            "interval_step": 1.0,
            "interval_max": 5.0,
        },
        "enable_utc": True,
    }


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("cxr_screen", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = make_app()


@setup_logging.connect
def _logging(**_: Any) -> None:
    """Our log format (plain or JSON lines) instead of Celery's."""
    from worker.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)


# Set once this process has passed check_ready_to_work: `cxr-screen worker` checks
# before Celery's banner, and the worker_init check then need not load the model, take
# the schema lock and warn a second time.
_ready = False


def check_ready_to_work(settings: Settings) -> None:
    """The whole model loads and the database is upgraded. A worker that cannot screen took
    every message and failed it (a model that does not load: the message was dropped and
    the study stayed ``queued``) or retried it for ever (a database that does not exist).
    A database that is merely down is not a reason: studies wait for it in retries."""
    from db.session import prepare_database
    from worker.model import Classifier

    Classifier(settings.model)
    problem = prepare_database(settings.database_url)
    if problem:
        log.warning("the database does not answer yet (%s); studies wait for it", problem)
    if settings.visibility_timeout <= settings.task_time_limit:
        log.warning(
            "CXR_VISIBILITY_TIMEOUT (%d s) is not longer than CXR_TASK_TIME_LIMIT (%d s): "
            "Redis hands a study still being screened to another worker",
            settings.visibility_timeout,
            settings.task_time_limit,
        )
    global _ready
    _ready = True


@worker_init.connect
def _check_and_serve_metrics(**_: Any) -> None:
    """Stop, in the main worker process, when the worker could not screen; serve
    Prometheus metrics (all pool processes aggregated) when a port is configured."""
    from db.session import DatabaseError
    from worker.errors import UserError
    from worker.privacy import privacy_warning

    settings = get_settings()
    try:
        if not _ready:  # plain `celery -A worker.celery_app worker`
            check_ready_to_work(settings)
    except (UserError, DatabaseError) as exc:
        log.error("the worker cannot start: %s", exc)
        raise SystemExit(2) from None  # Celery logs and ignores an Exception here
    if warning := privacy_warning(settings):
        log.warning(warning)
    if settings.metrics_port:
        from worker.metrics import prepare_multiprocess, serve
        from worker.queue.status import broker_queue_length

        prepare_multiprocess()
        try:
            serve(
                settings.metrics_port,
                queue_depth=lambda: broker_queue_length(settings.broker_url, QUEUE)[0],
            )
        except OSError as exc:  # Celery logs a traceback and starts without metrics
            log.error(
                "the worker cannot start: CXR_METRICS_PORT %d: %s",
                settings.metrics_port,
                exc.strerror or exc,
            )
            raise SystemExit(2) from None


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    """Each pool process loads the model once, after the fork."""
    from worker.tasks import load_worker_state

    load_worker_state()
