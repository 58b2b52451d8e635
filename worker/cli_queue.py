"""The distributed commands: ``ingest``, ``worker``, ``status``, ``requeue``.

Registered on the main Typer app by ``worker/cli.py`` (``register(app)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from config.settings import Settings, get_settings
from worker.cli_common import (
    BrokerUrl,
    DatabaseUrl,
    ExportPaths,
    ModelDir,
    console,
    existing_paths,
    progress_bars,
    settings_from,
    user_errors,
)
from worker.errors import UserError

BROKER_UNREACHABLE = 3  # `status`: the counts are shown, the queue's part is not


def _settings(**overrides: Any) -> Settings:
    """Settings with the flags applied, also exported to the environment.

    The Celery app reads the one settings object when it is imported, and worker pool
    processes inherit the environment: exporting the flags keeps them all in agreement.
    """
    get_settings().with_overrides(**overrides)  # a bad flag is named as typed, not as CXR_*
    names = {"broker_url", "database_url", "model", "log_level"}
    for name, value in overrides.items():
        if value is not None and name in names:
            os.environ[f"CXR_{name.upper()}"] = str(value)
    get_settings.cache_clear()
    return settings_from(**overrides)


@contextmanager
def sending(settings: Settings) -> Iterator[None]:
    """The broker checked before any row is written; lost while sending, one line."""
    from kombu.exceptions import OperationalError

    from db.session import safe_url
    from worker.queue.status import check_broker

    check_broker(settings.broker_url)
    try:
        yield
    except OperationalError as exc:
        raise UserError(
            f"the broker at {safe_url(settings.broker_url)} stopped taking messages ({exc}); "
            "the studies not sent stay queued: run the same command again once it is back"
        ) from exc


def register(app: typer.Typer) -> None:
    @app.command()
    @user_errors
    def ingest(
        paths: ExportPaths,
        broker_url: BrokerUrl = None,
        database_url: DatabaseUrl = None,
        model: ModelDir = None,
        force: Annotated[
            bool, typer.Option(help="Queue studies that already have a final result too.")
        ] = False,
    ) -> None:
        """Queue every study under PATHS for the Celery workers (headers only)."""
        from db.session import open_database, safe_url
        from worker.queue.ingest import IngestProgress
        from worker.queue.ingest import ingest as ingest_studies

        settings = _settings(broker_url=broker_url, database_url=database_url, model=model)
        exports = existing_paths(paths)
        from worker.tasks import enqueue

        sessions = open_database(settings.database_url)
        with sending(settings), progress_bars() as bars:
            scan = bars.add_task("reading headers", total=None)
            send = bars.add_task("queueing studies", total=None)
            hooks = IngestProgress(
                on_file=lambda _: bars.advance(scan),
                on_discovered=lambda n: bars.update(send, total=n),
                on_queued=lambda _: bars.advance(send),
            )
            summary = ingest_studies(
                exports, settings, enqueue, sessions=sessions, force=force, progress=hooks
            )
            bars.update(scan, total=summary.files)
        typer.echo(
            f"queued {summary.queued_studies} studies ({summary.queued_files} files) "
            f"on {safe_url(settings.broker_url)}; {summary.skipped_studies} studies already "
            f"had a result; {summary.rejected_files} files rejected from their header"
        )

    @app.command()
    @user_errors
    def worker(
        concurrency: Annotated[
            int | None,
            typer.Option(min=1, help="Pool processes (default: one per core it may use)."),
        ] = None,
        broker_url: BrokerUrl = None,
        database_url: DatabaseUrl = None,
        model: ModelDir = None,
        loglevel: Annotated[str | None, typer.Option(help="Overrides CXR_LOG_LEVEL.")] = None,
    ) -> None:
        """Run a Celery worker that screens queued studies (Ctrl-C to stop)."""
        settings = _settings(
            broker_url=broker_url, database_url=database_url, model=model, log_level=loglevel
        )
        from celery.bin.celery import celery
        from celery.signals import worker_shutting_down

        from worker.celery_app import QUEUE, check_ready_to_work
        from worker.runner import usable_cores

        # One line before Celery's banner; plain `celery worker` checks in worker_init.
        check_ready_to_work(settings)

        # No mingle or gossip: workers share no revoked-task or clock state, and mingle
        # alone waits about a second for replies at every start.
        argv = ["--app", "worker.celery_app", "worker", "--pool", "prefork", "-Q", QUEUE]
        argv += ["--loglevel", settings.log_level]
        argv += ["--without-mingle", "--without-gossip"]
        # Celery's own default is every core of the host, also in a container allowed a
        # few of them: each pool process holds the model and decodes films.
        argv += ["--concurrency", str(concurrency or usable_cores())]
        # Celery's own command, not app.worker_main(), which drops its exit code: a worker
        # Celery stopped on an unrecoverable error must not look like one stopped on purpose.
        # A stop asked for by a signal is a success, Ctrl-C included (Celery gives it 1).
        asked_to_stop: list[str] = []
        worker_shutting_down.connect(lambda sig, **_: asked_to_stop.append(sig), weak=False)
        code = celery.main(args=argv, prog_name="celery", standalone_mode=False)
        raise typer.Exit(0 if asked_to_stop or not isinstance(code, int) else code)

    @app.command()
    @user_errors
    def status(
        failed: Annotated[bool, typer.Option("--failed", help="List the failed studies.")] = False,
        broker_url: BrokerUrl = None,
        database_url: DatabaseUrl = None,
    ) -> None:
        """Studies per status, queue length and the age of the oldest queued study."""
        from sqlalchemy.orm import sessionmaker

        from db.repository import failed_studies
        from worker.celery_app import QUEUE
        from worker.queue.status import queue_status
        from worker.reporting import open_results

        settings = _settings(broker_url=broker_url, database_url=database_url)
        sessions = sessionmaker(open_results(settings.database_url), expire_on_commit=False)
        report = queue_status(settings, sessions, QUEUE)
        table = Table(title="cxr-screen status")
        names = ("queued", "processing", "screened", "rejected", "failed")
        for column in (*names, "queue length", "unacked", "oldest queued"):
            table.add_column(column, justify="right")
        age = report.oldest_queued_age
        table.add_row(
            *(str(report.counts[n]) for n in names),
            "?" if report.queue_length is None else str(report.queue_length),
            "?" if report.unacked is None else str(report.unacked),
            "-" if age is None else f"{age.total_seconds():.0f} s",
        )
        Console(width=160).print(table)
        if report.broker_error:
            error = escape(report.broker_error)
            console.print(f"[yellow]warning:[/yellow] broker unreachable: {error}")
        if failed:
            with sessions() as session:
                rows = failed_studies(session)
            listing = Table(title=f"studies with failed files ({len(rows)})")
            columns = ("study_instance_uid", "model_version", "status", "failed files")
            for column in (*columns, "attempts", "reason"):
                listing.add_column(column)
            for row in rows:
                listing.add_row(
                    row.study_instance_uid,
                    escape(row.model_version),
                    row.status,
                    f"{row.n_failed} of {row.n_instances}",
                    str(row.attempts),
                    escape(row.reason or ""),
                )
            Console(width=200).print(listing)
        if report.broker_error:
            raise typer.Exit(BROKER_UNREACHABLE)

    @app.command()
    @user_errors
    def requeue(
        failed: Annotated[bool, typer.Option("--failed", help="Send the failed studies.")] = False,
        stale: Annotated[
            bool,
            typer.Option(
                "--stale",
                help="Send the studies still queued or processing after --stale-minutes "
                "(their message was lost).",
            ),
        ] = False,
        stale_minutes: Annotated[
            float, typer.Option(min=0, help="Age at which a queued or processing study is stale.")
        ] = 120,
        broker_url: BrokerUrl = None,
        database_url: DatabaseUrl = None,
        model: ModelDir = None,
    ) -> None:
        """Send studies again: the failed ones (--failed), the stale ones (--stale)."""
        import datetime as dt

        from db.session import open_database
        from worker.queue.status import requeue as requeue_studies

        if not failed and not stale:
            console.print("[red]error:[/red] say what to requeue: --failed, --stale or both")
            raise typer.Exit(2)
        settings = _settings(broker_url=broker_url, database_url=database_url, model=model)
        from worker.tasks import enqueue

        with sending(settings):
            done = requeue_studies(
                settings,
                enqueue,
                sessions=open_database(settings.database_url),
                failed=failed,
                stale_after=dt.timedelta(minutes=stale_minutes) if stale else None,
            )
        skipped = f"; {len(done.skipped)} skipped (see the warnings)" if done.skipped else ""
        other = len(done.failed_other_model)
        others = f"; {other} stale under another model recorded failed" if other else ""
        typer.echo(f"requeued {len(done.sent)} studies{skipped}{others}")
