"""``cxr-screen report`` and ``cxr-screen export``: figures and results for a period."""

from __future__ import annotations

import datetime as dt
import sys
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from sqlalchemy import Engine

from worker import reporting
from worker.cli_common import DatabaseUrl, F, console, settings_from, user_errors
from worker.model import ModelError, read_card
from worker.reporting import NoResultsError

DATE_FORMATS = ["%Y-%m-%d"]


class ReportFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    html = "html"


class ExportFormat(StrEnum):
    csv = "csv"
    json = "json"


Since = Annotated[
    dt.datetime | None,
    typer.Option(formats=DATE_FORMATS, help="First day (UTC, YYYY-MM-DD), included."),
]
Until = Annotated[
    dt.datetime | None,
    typer.Option(formats=DATE_FORMATS, help="Last day (UTC, YYYY-MM-DD), included."),
]
Out = Annotated[
    Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")
]


def report_errors(function: F) -> F:
    """Nothing to report exits 1 (errors to fix exit 2, through ``user_errors``)."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except NoResultsError as exc:
            console.print(f"[yellow]nothing to report:[/yellow] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def register(app: typer.Typer) -> None:
    app.command("report")(user_errors(report_errors(report)))
    app.command("export")(user_errors(report_errors(export)))


def report(
    since: Since = None,
    until: Until = None,
    format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ReportFormat.table,
    out: Out = None,
    model_version: Annotated[
        str | None,
        typer.Option(
            help="Only this model version (default: all, or the configured model's when "
            "the period holds several)."
        ),
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Studies received, screened, rejected, failed and positive, turnaround and charts.

    Per day and model version (the daily_summary view) and for the whole period.
    `--format html` writes one self-contained page with charts.
    """
    settings = settings_from(database_url=database_url)
    period = reporting.Period(_day(since), _day(until))
    with console.status("opening the results database") as status:
        engine = reporting.open_results(settings.database_url)
        try:
            status.update(f"querying results ({period.describe()})")
            if model_version is None:
                model_version = default_model_version(engine, period, settings.model)
            else:
                reporting.check_model_version(engine, model_version)
            result = reporting.build_report(engine, period, model_version)
            status.update("drawing charts" if format is ReportFormat.html else "rendering")
            if format is ReportFormat.html:
                content = reporting.render_html(result)
            elif format is ReportFormat.json:
                content = reporting.render_json(result)
            elif format is ReportFormat.csv:
                content = reporting.render_csv(result)
            else:
                to_terminal = out is None and sys.stdout.isatty()
                content = reporting.render_table(result, color=to_terminal)
        finally:
            engine.dispose()
    reporting.write_text(content, out)
    if out is not None:
        console.print(
            f"wrote {format.value} report to {escape(str(out))}: "
            f"{result.totals.finished} studies finished, {len(result.daily)} day "
            f"row{'s' if len(result.daily) != 1 else ''}"
        )


def default_model_version(engine: Engine, period: reporting.Period, model: Path) -> str | None:
    try:
        configured: str | None = read_card(model).model_version
    except (ModelError, OSError, ValueError):  # no model here: every version is listed
        configured = None
    chosen = reporting.model_version_to_report(engine, period, configured)
    if chosen is not None:
        console.print(
            f"several model versions in {period.describe()}: reporting {escape(chosen)}, "
            "the configured model's (--model-version chooses another)",
            soft_wrap=True,
        )
    return chosen


def export(
    since: Annotated[
        dt.datetime,
        typer.Option(formats=DATE_FORMATS, help="First day (UTC, YYYY-MM-DD), included."),
    ],
    until: Until = None,
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="Output format.")
    ] = ExportFormat.csv,
    out: Out = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Study results finished in a period, one row per study, for other systems.

    Columns: study_instance_uid, accession_number, study_date, status, covid_probability,
    predicted_label, threshold, model_version, queued_at, finished_at (UTC), reason.
    No patient identifiers: patient_ref is not exported.
    """
    settings = settings_from(database_url=database_url)
    period = reporting.Period(_day(since), _day(until))
    engine = reporting.open_results(settings.database_url)
    try:
        content, count = reporting.render_export(
            reporting.export_rows(engine, period), format.value
        )
    finally:
        engine.dispose()
    if count == 0:
        raise reporting.NoResultsError(
            f"no study finished {period.describe()} in {reporting.safe_url(settings.database_url)}"
        )
    reporting.write_text(content, out)
    if out is not None:
        console.print(f"exported {count} studies ({period.describe()}) to {escape(str(out))}")


def _day(value: dt.datetime | None) -> dt.date | None:
    return value.date() if value is not None else None
