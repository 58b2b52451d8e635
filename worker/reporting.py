"""Period reports and result exports, read from the results tables and reporting views.

The daily figures come from the ``daily_summary`` view (migration 0002), so the command
and an analyst's SQL agree by construction. Period-wide figures are the sums of the
daily counts; the period's median and 95th-percentile turnaround are computed here with
the same definition as the view (linear interpolation between ranks, PostgreSQL's
``percentile_cont``), because percentiles do not add up across days.

Reports hold aggregates only: no accession numbers, UIDs or patient references.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Date, Engine, Float, Integer, String, column, func, select, table, text
from sqlalchemy.exc import SQLAlchemyError

from db.models import Prediction, Study
from db.repository import FINAL_STATUSES
from db.session import (
    DatabaseError,
    first_line,
    known_revision,
    make_engine,
    safe_url,
    upgrade,
)
from worker.csv_rows import write_csv_row
from worker.errors import UserError
from worker.imaging.enum import StudyStatus

# Finished, whatever the outcome: the final results, and failed (which a requeue retries).
FINISHED_STATUSES = (*FINAL_STATUSES, StudyStatus.FAILED.value)
HISTOGRAM_BINS = 20

DAILY_SUMMARY = table(
    "daily_summary",
    column("day", Date),
    column("model_version", String),
    column("received", Integer),
    column("screened", Integer),
    column("rejected", Integer),
    column("failed", Integer),
    column("positive", Integer),
    column("positivity_rate", Float),
    column("median_turnaround_s", Float),
    column("p95_turnaround_s", Float),
)

# The hand-off columns of `export`, in order. patient_ref (a keyed hash) is left out on
# purpose: receiving systems match on the accession number, and a pseudonym that links
# one patient's studies adds re-identification risk for no hand-off use.
EXPORT_COLUMNS = (
    "study_instance_uid",
    "accession_number",
    "study_date",
    "status",
    "covid_probability",
    "predicted_label",
    "threshold",
    "model_version",
    "queued_at",
    "finished_at",
    "reason",
)


class ReportError(UserError):
    """A report cannot be made; the message says why and what to do."""


class NoResultsError(ReportError):
    """The database holds no results for the requested period."""


@dataclass(frozen=True)
class Period:
    """Whole UTC days, both ends included; None is open-ended."""

    since: dt.date | None = None
    until: dt.date | None = None

    def __post_init__(self) -> None:
        if self.since and self.until and self.since > self.until:
            raise ReportError(f"--since {self.since} is after --until {self.until}")

    @property
    def start(self) -> dt.datetime | None:
        return _midnight(self.since) if self.since else None

    @property
    def end(self) -> dt.datetime | None:
        """The first instant after the period; None after the last day there is."""
        if self.until is None or self.until == dt.date.max:
            return None
        return _midnight(self.until + dt.timedelta(days=1))

    def describe(self) -> str:
        if self.since and self.until:
            return f"{self.since} to {self.until}"
        if self.since:
            return f"since {self.since}"
        if self.until:
            return f"until {self.until}"
        return "all time"


@dataclass
class Figures:
    """Study counts and turnaround for one day and model version, or for a whole period."""

    received: int = 0
    screened: int = 0
    rejected: int = 0
    failed: int = 0
    positive: int = 0
    positivity_rate: float | None = None
    median_turnaround_s: float | None = None
    p95_turnaround_s: float | None = None

    @property
    def finished(self) -> int:
        return self.screened + self.rejected + self.failed


@dataclass
class DailyRow(Figures):
    day: dt.date = dt.date.min
    model_version: str = ""


@dataclass
class Report:
    period: Period
    database: str
    generated_at: dt.datetime
    model_version: str | None
    totals: Figures
    daily: list[DailyRow] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    rejection_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def model_versions(self) -> list[str]:
        return sorted({row.model_version for row in self.daily})


# --- database ----------------------------------------------------------------------


def open_results(url: str) -> Engine:
    """An engine on an existing results database, upgraded so the views exist.

    Unlike ``run``, reading never creates a database: a SQLite path that does not exist
    is an error, not a new empty file, and a database without cxr-screen's schema (an
    empty one, another program's) gets none.
    """
    engine = make_engine(url)
    if engine.dialect.name == "sqlite":
        path = engine.url.database
        if path and path != ":memory:" and not Path(path).is_file():
            raise DatabaseError(
                f"no results database at {path} (check --database-url or CXR_DATABASE_URL)"
            )
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        engine.dispose()
        raise DatabaseError(f"cannot connect to {safe_url(url)}: {first_line(exc)}") from None
    try:
        revision = known_revision(engine)
    except DatabaseError:
        engine.dispose()
        raise
    if revision is None:
        engine.dispose()
        raise NoResultsError(no_studies_yet(url))
    upgrade(engine)
    return engine


def no_studies_yet(url: str) -> str:
    return (
        f"the results database {safe_url(url)} holds no studies yet "
        "(screen some with `cxr-screen run` or `cxr-screen ingest` first)"
    )


def model_version_to_report(engine: Engine, period: Period, configured: str | None) -> str | None:
    """The model version a report without ``--model-version`` covers: all (None) when the
    period holds one, else the configured model's. Totals summed over versions count a
    study once per version that has a row for it (a re-screen with a new model, or the
    ``failed`` row a version mismatch leaves), and the thresholds differ."""
    view = DAILY_SUMMARY.c
    query = select(view.model_version).distinct().order_by(view.model_version)
    if period.since:
        query = query.where(view.day >= period.since)
    if period.until:
        query = query.where(view.day <= period.until)
    with engine.connect() as connection:
        versions = list(connection.scalars(query))
    if len(versions) <= 1:
        return None
    if configured in versions:
        return configured
    raise ReportError(
        f"{period.describe()} holds results of {len(versions)} model versions "
        f"({', '.join(versions)}): choose one with --model-version"
    )


def check_model_version(engine: Engine, model_version: str) -> None:
    """ReportError for a version the database has no study of: a typo read as an empty
    period (exit 1), which a cron job takes for a quiet day."""
    query = select(Study.model_version).distinct().order_by(Study.model_version)
    with engine.connect() as connection:
        versions = list(connection.scalars(query))
    if versions and model_version not in versions:
        raise ReportError(
            f"no results of model version {model_version!r} in the database "
            f"(it holds {', '.join(versions)})"
        )


def build_report(engine: Engine, period: Period, model_version: str | None = None) -> Report:
    """Every figure of a period report. Raises NoResultsError when there is nothing."""
    with engine.connect() as connection:
        daily = _daily_rows(connection, period, model_version)
        turnaround, probabilities, thresholds = _finished_studies(connection, period, model_version)
        reasons = _rejection_reasons(connection, period, model_version)
        if not daily and not reasons:
            total = connection.execute(select(func.count()).select_from(Study)).scalar_one()
            where = safe_url(str(engine.url))
            if total == 0:
                raise NoResultsError(no_studies_yet(str(engine.url)))
            scope = f" for model {model_version}" if model_version else ""
            raise NoResultsError(f"no results {period.describe()}{scope} in {where}")
    totals = Figures(
        **{
            name: sum(getattr(row, name) for row in daily)
            for name in ("received", "screened", "rejected", "failed", "positive")
        }
    )
    totals.positivity_rate = totals.positive / totals.screened if totals.screened else None
    turnaround.sort()
    totals.median_turnaround_s = percentile(turnaround, 0.5)
    totals.p95_turnaround_s = percentile(turnaround, 0.95)
    return Report(
        period=period,
        database=safe_url(str(engine.url)),
        generated_at=dt.datetime.now(dt.UTC).replace(microsecond=0),
        model_version=model_version,
        totals=totals,
        daily=daily,
        probabilities=probabilities,
        thresholds=thresholds,
        rejection_reasons=reasons,
    )


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between ranks, as PostgreSQL's percentile_cont and the view."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _daily_rows(connection: Any, period: Period, model_version: str | None) -> list[DailyRow]:
    view = DAILY_SUMMARY.c
    query = select(DAILY_SUMMARY).order_by(view.day, view.model_version)
    if period.since:
        query = query.where(view.day >= period.since)
    if period.until:
        query = query.where(view.day <= period.until)
    if model_version:
        query = query.where(view.model_version == model_version)
    rows = []
    for row in connection.execute(query).mappings():
        values = dict(row)
        day = values.pop("day")
        if isinstance(day, str):  # a SQLite view column has no declared type
            day = dt.date.fromisoformat(day)
        rows.append(DailyRow(day=day, **values))
    return rows


def _finished_studies(
    connection: Any, period: Period, model_version: str | None
) -> tuple[list[float], list[float], list[float]]:
    """Turnaround seconds, study probabilities and thresholds of the studies finished."""
    query = select(
        Study.status, Study.covid_probability, Study.threshold, Study.queued_at, Study.finished_at
    ).where(Study.status.in_(FINISHED_STATUSES), Study.finished_at.is_not(None))
    query = _in_period(query, Study.finished_at, period)
    if model_version:
        query = query.where(Study.model_version == model_version)
    turnaround: list[float] = []
    probabilities: list[float] = []
    thresholds: set[float] = set()
    for status, probability, threshold, queued_at, finished_at in connection.execute(query):
        if queued_at is not None:
            turnaround.append((finished_at - queued_at).total_seconds())
        if status == "screened" and probability is not None:
            probabilities.append(probability)
            if threshold is not None:
                thresholds.add(round(threshold, 6))
    return turnaround, probabilities, sorted(thresholds)


def _rejection_reasons(
    connection: Any, period: Period, model_version: str | None
) -> dict[str, int]:
    """Files not screened, by reason_code (per file, as in the predictions table)."""
    code = func.coalesce(Prediction.reason_code, "unknown")
    query = (
        select(code, func.count())
        .where(Prediction.status != "screened")
        .group_by(code)
        .order_by(func.count().desc(), code)
    )
    query = _in_period(query, Prediction.updated_at, period)
    if model_version:
        query = query.where(Prediction.model_version == model_version)
    return {reason: count for reason, count in connection.execute(query)}


def _in_period(query: Any, timestamp: Any, period: Period) -> Any:
    if period.start:
        query = query.where(timestamp >= period.start)
    if period.end:
        query = query.where(timestamp < period.end)
    return query


# --- export --------------------------------------------------------------------------


def export_rows(engine: Engine, period: Period) -> Iterator[dict[str, Any]]:
    """One dict per study finished in the period, oldest first, values as text-ready."""
    query = select(*(getattr(Study, name) for name in EXPORT_COLUMNS)).where(
        Study.status.in_(FINISHED_STATUSES), Study.finished_at.is_not(None)
    )
    query = _in_period(query, Study.finished_at, period).order_by(
        Study.finished_at, Study.study_instance_uid, Study.model_version
    )
    with engine.connect() as connection:
        for row in connection.execute(query.execution_options(yield_per=1000)).mappings():
            yield {name: _plain(row[name]) for name in EXPORT_COLUMNS}


def render_export(rows: Iterator[dict[str, Any]], fmt: str) -> tuple[str, int]:
    """The rows as CSV (header first) or a JSON array, and how many there were."""
    buffer = io.StringIO()
    count = 0
    if fmt == "csv":
        write_csv_row(buffer, EXPORT_COLUMNS)
        for row in rows:
            write_csv_row(buffer, ["" if row[k] is None else row[k] for k in EXPORT_COLUMNS])
            count += 1
    else:
        records = list(rows)
        count = len(records)
        json.dump(records, buffer, indent=1)
        buffer.write("\n")
    return buffer.getvalue(), count


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:  # SQLite returns the stored UTC time without a zone
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat(timespec="seconds")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


# --- rendering -----------------------------------------------------------------------

FIGURE_COLUMNS = [f.name for f in fields(Figures)]
FIGURE_LABELS = (
    "received",
    "screened",
    "rejected",
    "failed",
    "positive",
    "positivity",
    "median s",
    "p95 s",
)


def report_dict(report: Report) -> dict[str, Any]:
    counts, edges = histogram(report.probabilities)
    return {
        "period": {
            "since": _plain(report.period.since),
            "until": _plain(report.period.until),
        },
        "database": report.database,
        "generated_at": _plain(report.generated_at),
        "model_version": report.model_version,
        "model_versions": report.model_versions,
        "totals": asdict(report.totals),
        "daily": [{k: _plain(v) for k, v in _row_items(row)} for row in report.daily],
        "probability_histogram": {"edges": edges, "counts": counts},
        "thresholds": report.thresholds,
        "rejection_reasons": report.rejection_reasons,
    }


def render_json(report: Report) -> str:
    return json.dumps(report_dict(report), indent=2) + "\n"


def render_csv(report: Report) -> str:
    """The daily rows (one per day and model version), as the daily_summary view."""
    buffer = io.StringIO()
    write_csv_row(buffer, ["day", "model_version", *FIGURE_COLUMNS])
    for row in report.daily:
        write_csv_row(buffer, ["" if v is None else _plain(v) for _, v in _row_items(row)])
    return buffer.getvalue()


def render_table(report: Report, width: int | None = None, color: bool = True) -> str:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Database paths, model versions and reasons are data: "[...]" in them is not markup.
    out = Console(file=io.StringIO(), width=width or 120, force_terminal=color, no_color=not color)
    title = f"cxr-screen report: {report.period.describe()} ({escape(report.database)})"
    totals = Table(title=title)
    for label in FIGURE_LABELS:
        totals.add_column(label, justify="right")
    totals.add_row(*_figure_cells(report.totals))
    out.print(totals)
    daily = Table(title="per day (UTC) and model version")
    daily.add_column("day")
    daily.add_column("model")
    for label in FIGURE_LABELS:
        daily.add_column(label, justify="right")
    for row in report.daily:
        daily.add_row(row.day.isoformat(), escape(row.model_version), *_figure_cells(row))
    out.print(daily)
    if report.rejection_reasons:
        reasons = Table(title="files not screened, by reason")
        reasons.add_column("reason_code")
        reasons.add_column("files", justify="right")
        for reason, count in report.rejection_reasons.items():
            reasons.add_row(escape(reason), str(count))
        out.print(reasons)
    file = out.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def histogram(values: Sequence[float], bins: int = HISTOGRAM_BINS) -> tuple[list[int], list[float]]:
    edges = [round(i / bins, 6) for i in range(bins + 1)]
    counts = [0] * bins
    for value in values:
        counts[min(int(value * bins), bins - 1)] += 1
    return counts, edges


def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, charts as SVG data URIs, no external URL."""
    charts = [
        ("volume", "Studies finished per day, and positivity", _volume_chart(report)),
        ("probabilities", "COVID-19 probability of screened studies", _histogram_chart(report)),
        ("reasons", "Files not screened, by reason", _reasons_chart(report)),
    ]
    e = html.escape
    figures = "\n".join(
        f'<figure><img class="chart" id="chart-{key}" alt="{e(title)}" '
        f'src="data:image/svg+xml;base64,{image}"><figcaption>{e(title)}</figcaption></figure>'
        for key, title, image in charts
    )
    figure_headers = "".join(f"<th>{e(label)}</th>" for label in FIGURE_LABELS)
    body_rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{e(cell)}</td>"
            for cell in (row.day.isoformat(), row.model_version, *_figure_cells(row))
        )
        + "</tr>"
        for row in report.daily
    )
    totals = "".join(f"<td>{e(cell)}</td>" for cell in _figure_cells(report.totals))
    reasons = "\n".join(
        f"<tr><td>{e(reason)}</td><td>{count}</td></tr>"
        for reason, count in report.rejection_reasons.items()
    )
    scope = f", model {report.model_version}" if report.model_version else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cxr-screen report: {e(report.period.describe())}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 64rem;
       padding: 0 1rem; color: #1d2329; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ padding: .25rem .6rem; border-bottom: 1px solid #d0d7de; text-align: right; }}
#daily th:nth-child(-n+2), #daily td:nth-child(-n+2),
#reasons th:first-child, #reasons td:first-child {{ text-align: left; }}
figure {{ margin: 1.5rem 0; }}
img.chart {{ width: 100%; max-width: 60rem; height: auto; display: block; }}
figcaption, .note {{ color: #57606a; font-size: .9rem; }}
</style>
</head>
<body>
<h1>cxr-screen report</h1>
<p>{e(report.period.describe())}{e(scope)} &middot; database {e(report.database)}
&middot; generated {e(_plain(report.generated_at))}</p>
<h2>Totals</h2>
<table id="totals"><tr>{figure_headers}</tr><tr>{totals}</tr></table>
{figures}
<h2>Per day (UTC) and model version</h2>
<table id="daily"><tr><th>day</th><th>model</th>{figure_headers}</tr>
{body_rows}
</table>
<h2>Files not screened, by reason</h2>
<table id="reasons"><tr><th>reason_code</th><th>files</th></tr>
{reasons}
</table>
<p class="note">Days are UTC. Received counts studies by the day they were queued; the
other columns by the day they finished. Turnaround is queued to finished, in seconds.
A screening aid trained on public data, not a diagnostic device.</p>
</body>
</html>
"""


# Nothing outside the page itself can load: images are data URIs, CSS is inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _row_items(row: DailyRow) -> list[tuple[str, Any]]:
    return [("day", row.day), ("model_version", row.model_version)] + [
        (name, getattr(row, name)) for name in FIGURE_COLUMNS
    ]


def _figure_cells(figures: Figures) -> list[str]:
    def number(value: float | None, pattern: str) -> str:
        return "-" if value is None else format(value, pattern)

    return [
        str(figures.received),
        str(figures.screened),
        str(figures.rejected),
        str(figures.failed),
        str(figures.positive),
        number(figures.positivity_rate, ".1%"),
        number(figures.median_turnaround_s, ".1f"),
        number(figures.p95_turnaround_s, ".1f"),
    ]


# --- charts (matplotlib, imported only for html) --------------------------------------


def _figure(height: float = 3.2) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(
            "html reports need matplotlib: pip install matplotlib (or use --format table)"
        ) from None
    return Figure(figsize=(9, height), dpi=100, layout="constrained")


def _svg(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _empty(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def volume_slots(first: dt.date, last: dt.date) -> tuple[str, list[dt.date]]:
    """The chart's bars from ``first`` to ``last``: days up to three months, then weeks
    (from Monday) up to two years, then months - a bar per day of an all-time report
    of three years was a 1 MB page of bars thinner than a pixel."""
    span = (last - first).days
    unit = "day" if span < 92 else "week" if span < 731 else "month"
    days = (first + dt.timedelta(days=i) for i in range(span + 1))
    return unit, sorted({_slot_of(day, unit) for day in days})


def _slot_of(day: dt.date, unit: str) -> dt.date:
    if unit == "week":
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1) if unit == "month" else day


def _volume_chart(report: Report) -> str:
    figure = _figure()
    axes = figure.add_subplot()
    if not report.daily:
        _empty(axes, "no studies in this period")
        return _svg(figure)
    unit, slots = volume_slots(min(r.day for r in report.daily), max(r.day for r in report.daily))
    by_slot = {slot: Figures() for slot in slots}
    for row in report.daily:
        slot = by_slot[_slot_of(row.day, unit)]
        for name in ("received", "screened", "rejected", "failed", "positive"):
            setattr(slot, name, getattr(slot, name) + getattr(row, name))
    values = list(by_slot.values())
    x = list(range(len(slots)))
    screened = [v.screened for v in values]
    rejected = [v.rejected for v in values]
    failed = [v.failed for v in values]
    axes.bar(x, screened, color="#4c72b0", label="screened")
    axes.bar(x, rejected, bottom=screened, color="#dd8452", label="rejected")
    bottom = [s + r for s, r in zip(screened, rejected, strict=True)]
    axes.bar(x, failed, bottom=bottom, color="#c44e52", label="failed")
    axes.set_ylabel(f"studies finished a {unit}")
    step = max(1, -(-len(slots) // 12))
    shown = [s.isoformat()[:7] if unit == "month" else s.isoformat() for s in slots]
    axes.set_xticks(x[::step], shown[::step])
    axes.tick_params(axis="x", labelrotation=30)
    rate_axes = axes.twinx()
    rates = [v.positive / v.screened * 100 if v.screened else float("nan") for v in values]
    rate_axes.plot(x, rates, color="#2b2b2b", marker="o", label="positivity %")
    rate_axes.set_ylabel("positivity (% of screened)")
    rate_axes.set_ylim(0, max([5.0, *(r for r in rates if r == r)]) * 1.15)
    handles, labels = axes.get_legend_handles_labels()
    more, more_labels = rate_axes.get_legend_handles_labels()
    axes.legend(handles + more, labels + more_labels, loc="upper left", fontsize="small")
    return _svg(figure)


def _histogram_chart(report: Report) -> str:
    figure = _figure()
    axes = figure.add_subplot()
    if not report.probabilities:
        _empty(axes, "no screened studies in this period")
        return _svg(figure)
    counts, edges = histogram(report.probabilities)
    axes.stairs(counts, edges, fill=True, color="#4c72b0")
    for threshold in report.thresholds:
        axes.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
    axes.set_xlim(0, 1)
    axes.set_xlabel("COVID-19 probability (highest over the study's frontal images)")
    axes.set_ylabel("studies")
    if report.thresholds:
        axes.legend(fontsize="small")
    return _svg(figure)


def _reasons_chart(report: Report) -> str:
    reasons = report.rejection_reasons
    figure = _figure(max(2.0, 0.8 + 0.4 * len(reasons)))
    axes = figure.add_subplot()
    if not reasons:
        _empty(axes, "every file was screened")
        return _svg(figure)
    names = list(reasons)[::-1]
    axes.barh(names, [reasons[n] for n in names], color="#dd8452")
    axes.set_xlabel("files")
    return _svg(figure)


# --- output --------------------------------------------------------------------------


def write_text(content: str, out: Path | None) -> None:
    """To stdout, or atomically to a file (a reader never sees half a file).

    The file keeps the mode of the one it replaces, or gets the umask's; a link is
    followed, and a device or pipe (``/dev/stdout``) is written in place."""
    own = sys.stdout if out is None else own_stream(out)
    if own is not None:
        own.write(content)
        own.flush()
    elif out is not None:
        write_file(content, out)


def write_file(content: str, out: Path) -> None:
    if names_a_stream(out):
        try:
            with out.open("a", encoding="utf-8", newline="") as stream:
                stream.write(content)
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror}") from exc
        return
    target = out.resolve()
    if not target.parent.is_dir():
        raise FileNotFoundError(f"no such folder for --out: {target.parent}")
    if target.is_dir():
        raise IsADirectoryError(f"--out names a folder, not a file: {out}")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:  # named after the file asked for, not the temporary one
        raise UserError(f"cannot write {out}: {exc.strerror}") from exc
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(content)
        os.chmod(temporary, _file_mode(target))
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


DESCRIPTOR_NAME = re.compile(r"/dev/(stdout|stderr|fd/\d+)|/proc/[^/]+/fd/\d+")


def names_a_stream(out: Path) -> bool:
    """A device, a pipe or a file descriptor's name (``/dev/stdout``, ``/dev/fd/63``).

    Opened by that name, not resolved: ``/dev/stdout`` on a pipe resolves to
    ``/proc/<pid>/fd/pipe:[N]``, which cannot be opened, and after ``>> log`` to the log
    itself, which a replace would have emptied; appending keeps what stdout held."""
    if DESCRIPTOR_NAME.fullmatch(str(out.absolute())):
        return True
    try:
        mode = out.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def own_stream(out: Path) -> TextIO | None:
    """This process's stdout or stderr when ``out`` names it (``/dev/stdout``,
    ``/dev/fd/2``): written through the open descriptor, whose position the shell's
    ``> log 2>&1`` shares; a second opening of the file wrote over the report's start."""
    if not names_a_stream(out):
        return None
    try:
        named = out.stat()
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            mine = os.fstat(stream.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            continue
        if (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino):
            return stream
    return None


def _file_mode(target: Path) -> int:
    """The replaced file's permissions, or those a new file gets under the umask."""
    if target.is_file():
        return stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
