"""Reporting: the SQL views, `report` in every format, `export`, and the HTML in a browser."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, insert, inspect, text
from typer.testing import CliRunner

from config.settings import Settings
from db.models import Prediction, Study
from db.session import open_database
from tests.sql import rows
from worker import reporting
from worker.cli import app
from worker.reporting import NoResultsError, Period
from worker.runner import run

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # as .ci/run looks for it
UTC = dt.UTC
DAY1 = dt.date(2024, 3, 1)


def at(day: dt.date, hour: int, minute: int = 0, second: float = 0) -> dt.datetime:
    start = dt.datetime.combine(day, dt.time(hour, minute), tzinfo=UTC)
    return start + dt.timedelta(seconds=second)


def study(uid: str, status: str, queued: dt.datetime | None, seconds: float | None, **extra: Any):
    finished = queued + dt.timedelta(seconds=seconds) if queued and seconds is not None else None
    probability = extra.pop("p", None)
    row = {
        "study_instance_uid": uid,
        "model_version": "m1",
        "status": status,
        "accession_number": f"ACC-{uid}",
        "patient_ref": f"ref{uid}".ljust(32, "0"),
        "study_date": DAY1,
        "covid_probability": probability,
        "predicted_label": None
        if probability is None
        else "covid"
        if probability >= 0.6
        else "normal",
        "threshold": 0.6,
        "n_instances": 1,
        "n_screened": int(status == "screened"),
        "n_rejected": int(status == "rejected"),
        "n_failed": int(status == "failed"),
        "attempts": 1,
        "queued_at": queued,
        "started_at": queued,
        "finished_at": finished,
    }
    return {**row, **extra}


def fill(url: str, studies: list[dict[str, Any]], files: list[dict[str, Any]] = ()) -> None:
    sessions = open_database(url)
    with sessions.begin() as session:
        session.execute(insert(Study), studies)
        if files:
            session.execute(insert(Prediction), list(files))
    sessions.kw["bind"].dispose()


def prediction(source: str, status: str, code: str | None, when: dt.datetime) -> dict[str, Any]:
    return {
        "source": source,
        "status": status,
        "reason_code": code,
        "model_version": "m1",
        "created_at": when,
        "updated_at": when,
    }


def synthetic(seed: int = 7, n: int = 240) -> list[dict[str, Any]]:
    """Several days, two model versions, every status, turnarounds over four decades."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        day = DAY1 + dt.timedelta(days=rng.choice([0, 0, 0, 1, 1, 2, 5]))
        queued = at(day, rng.randrange(24), rng.randrange(60), rng.uniform(0, 60))
        status = rng.choice(["screened"] * 6 + ["rejected", "failed", "queued", "processing"])
        seconds = None if status in ("queued", "processing") else rng.lognormvariate(3, 1.5)
        p = rng.random() if status == "screened" else None
        out.append(study(f"1.2.{i}", status, queued, seconds, p=p, model_version=f"m{i % 2 + 1}"))
    return out


DAILY = (
    "SELECT day, model_version, received, screened, rejected, failed, positive, "
    "positivity_rate, median_turnaround_s, p95_turnaround_s FROM daily_summary "
    "ORDER BY day, model_version"
)


def normalised(found: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Days as text and seconds to the millisecond (SQLite's julianday resolution)."""
    return [
        (str(r[0]), *r[1:7], *(None if v is None else round(v, 2) for v in r[7:])) for r in found
    ]


# --- the views ----------------------------------------------------------------------


@pytest.mark.services
def test_view_percentiles_equal_postgresql_percentile_cont(postgres_url: str) -> None:
    fill(postgres_url, synthetic())
    native = rows(
        postgres_url,
        "SELECT CAST((finished_at AT TIME ZONE 'UTC') AS DATE), model_version, "
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - queued_at)),"
        "percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM finished_at - queued_at))"
        " FROM studies WHERE status IN ('screened', 'rejected', 'failed')"
        " GROUP BY 1, 2 ORDER BY 1, 2",
    )
    view = [(r[0], r[1], r[8], r[9]) for r in rows(postgres_url, DAILY) if r[8] is not None]
    assert len(view) == len(native) >= 6
    for mine, theirs in zip(view, native, strict=True):
        assert mine[:2] == theirs[:2]
        assert mine[2] == pytest.approx(float(theirs[2]), abs=1e-6)
        assert mine[3] == pytest.approx(float(theirs[3]), abs=1e-6)


@pytest.mark.services
def test_sqlite_and_postgresql_views_agree(sqlite_url: str, postgres_url: str) -> None:
    for url in (sqlite_url, postgres_url):
        fill(url, synthetic())
    assert normalised(rows(sqlite_url, DAILY)) == normalised(rows(postgres_url, DAILY))
    positives = "SELECT accession_number, covid_probability FROM positive_studies ORDER BY 1"
    assert rows(sqlite_url, positives) == rows(postgres_url, positives)


def documented_queries() -> list[str]:
    """The SQL examples, wherever the docs keep them (README or docs/)."""
    from config.settings import REPO_ROOT

    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    blocks = [
        block
        for page in pages
        if page.exists()
        for block in re.findall(r"```sql\n(.*?)```", page.read_text(), re.S)
    ]
    return [q.strip() for block in blocks for q in block.split(";") if q.strip()]


def on_views(query: str) -> bool:
    return "daily_summary" in query or "positive_studies" in query


def test_documented_queries_run(database_url: str) -> None:
    """Every example runs on both databases (one rounded a double, which PostgreSQL
    refuses); those on the views find the synthetic studies."""
    queries = documented_queries()
    assert sum(map(on_views, queries)) >= 3, "the docs show queries on the reporting views"
    fill(database_url, synthetic())
    for query in queries:
        found = rows(database_url, query)
        assert found or not on_views(query), query


@pytest.mark.services
def test_documented_queries_answer_alike_whatever_the_session_time_zone(
    postgres_url: str,
) -> None:
    """A date compared with a timestamptz is read in the session's zone: the days of an
    example must be UTC days, as the views' are."""
    fill(postgres_url, synthetic())
    for query in documented_queries():
        in_utc = rows(postgres_url, query, timezone="UTC")
        assert rows(postgres_url, query, timezone="America/Los_Angeles") == in_utc, query


def test_daily_summary_counts_by_day_and_percentiles_on_few_rows(database_url: str) -> None:
    day2 = DAY1 + dt.timedelta(days=1)
    fill(
        database_url,
        [
            study("a", "screened", at(DAY1, 9), 10, p=0.9),
            study("b", "screened", at(DAY1, 10), 20, p=0.1),
            study("c", "rejected", at(DAY1, 11), 30),
            study("d", "failed", at(DAY1, 12), 40),
            # queued before midnight UTC, finished after: received day 1, finished day 2
            study("e", "screened", at(DAY1, 23, 59, 50), 20, p=0.7),
            study("f", "queued", at(DAY1, 13), None),
            study("g", "processing", at(day2, 8), None),
        ],
    )
    found = {str(r[0]): r[2:] for r in rows(database_url, DAILY)}
    # received, screened, rejected, failed, positive, rate, median, p95
    one = found[DAY1.isoformat()]
    assert one[:6] == (6, 2, 1, 1, 1, 0.5)
    assert one[6] == pytest.approx(25, abs=1e-2)  # mean of ranks 1 and 2 of 10, 20, 30, 40
    assert one[7] == pytest.approx(38.5, abs=1e-2)  # 30 + 0.85 * (40 - 30)
    two = found[day2.isoformat()]
    assert two[:6] == (1, 1, 0, 0, 1, 1.0)
    assert two[6] == two[7] == pytest.approx(20, abs=1e-2)


@pytest.mark.services
def test_view_days_are_utc_whatever_the_session_time_zone(postgres_url: str) -> None:
    fill(postgres_url, [study("late", "screened", at(DAY1, 23, 30), 60, p=0.2)])
    for zone in ("UTC", "Pacific/Auckland", "America/Los_Angeles"):
        (row,) = rows(postgres_url, DAILY, timezone=zone)
        assert (row[0], row[2], row[3]) == (DAY1, 1, 1), zone


@pytest.mark.services
def test_reports_of_a_real_run(database_url: str, dicom_dir: Path, model_dir: Path) -> None:
    days = {dt.datetime.now(UTC).date().isoformat()}
    started = time.monotonic()
    summary = run([dicom_dir], Settings(database_url=database_url, model=model_dir, workers=2))
    took = time.monotonic() - started
    days.add(dt.datetime.now(UTC).date().isoformat())  # a run across midnight UTC
    (daily,) = rows(database_url, DAILY)
    assert str(daily[0]) in days
    today = dt.date.fromisoformat(str(daily[0]))
    received, screened, rejected, failed, positive = daily[2:7]
    assert received == summary.studies
    assert (screened, rejected, failed) == (summary.screened, summary.rejected, summary.failed)
    assert positive == summary.positives
    # seconds (not milliseconds), within the run
    assert daily[8] is not None and 0 <= daily[8] <= daily[9] <= took + 1
    positives = rows(
        database_url, "SELECT accession_number, covid_probability FROM positive_studies"
    )
    assert len(positives) == summary.positives

    engine = reporting.open_results(database_url)
    report = reporting.build_report(engine, Period(since=today, until=today))
    assert report.totals.finished == summary.studies
    assert report.totals.positive == summary.positives
    assert len(report.probabilities) == summary.screened
    not_screened = rows(database_url, "SELECT count(*) FROM predictions WHERE status <> 'screened'")
    assert sum(report.rejection_reasons.values()) == not_screened[0][0] > 0
    # One day in the period: the period's percentiles are the view's.
    assert report.totals.median_turnaround_s == pytest.approx(daily[8], abs=2e-3)
    assert report.totals.p95_turnaround_s == pytest.approx(daily[9], abs=2e-3)

    exported = list(csv.DictReader(io.StringIO(export_csv(engine, today))))
    engine.dispose()
    assert len(exported) == summary.studies
    assert list(exported[0]) == list(reporting.EXPORT_COLUMNS)
    refs = rows(database_url, "SELECT patient_ref FROM studies WHERE patient_ref IS NOT NULL")
    dump = json.dumps(exported)
    assert refs and not any(ref in dump for (ref,) in refs), "no patient reference is exported"
    positive_uids = {r["study_instance_uid"] for r in exported if r["predicted_label"] == "covid"}
    assert len(positive_uids) == summary.positives


def export_csv(engine: Any, since: dt.date, until: dt.date | None = None) -> str:
    content, _ = reporting.render_export(reporting.export_rows(engine, Period(since, until)), "csv")
    return content


# --- report and export -----------------------------------------------------------------


@pytest.fixture()
def filled(sqlite_url: str) -> str:
    fill(
        sqlite_url,
        synthetic(),
        [
            prediction(f"/x/{i}.dcm", "rejected", code, at(DAY1, 9))
            for i, code in enumerate(["unreadable"] * 3 + ["not_frontal"] * 2 + [None])
        ]
        + [prediction("/x/late.dcm", "failed", "error", at(DAY1 + dt.timedelta(days=9), 9))],
    )
    return sqlite_url


def test_report_period_and_model_filters(filled: str) -> None:
    engine = reporting.open_results(filled)
    everything = reporting.build_report(engine, Period())
    first_two = reporting.build_report(engine, Period(DAY1, DAY1 + dt.timedelta(days=1)))
    only_m2 = reporting.build_report(engine, Period(), model_version="m2")
    assert {r.day for r in first_two.daily} == {DAY1, DAY1 + dt.timedelta(days=1)}
    assert first_two.totals.finished < everything.totals.finished
    assert everything.totals.received == 240
    assert only_m2.model_versions == ["m2"] and 0 < only_m2.totals.received < 240
    # `--until 9999-12-31` ("no end") ended in a traceback (date overflow) and exit 1
    assert reporting.build_report(engine, Period(until=dt.date.max)).totals == everything.totals
    assert first_two.rejection_reasons == {"unreadable": 3, "not_frontal": 2, "unknown": 1}
    assert everything.rejection_reasons["error"] == 1
    with pytest.raises(NoResultsError, match="no results 2030-01-01 to 2030-01-02"):
        reporting.build_report(engine, Period(dt.date(2030, 1, 1), dt.date(2030, 1, 2)))
    engine.dispose()


def test_report_on_an_empty_database_says_so(sqlite_url: str) -> None:
    open_database(sqlite_url).kw["bind"].dispose()
    engine = reporting.open_results(sqlite_url)
    with pytest.raises(NoResultsError, match="holds no studies yet"):
        reporting.build_report(engine, Period())
    engine.dispose()


def test_report_on_a_database_without_the_schema_adds_none(database_url: str) -> None:
    """An empty database, or another program's: reading must not write cxr-screen's
    tables and views into it."""
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE customers (id integer)"))
    with pytest.raises(NoResultsError, match="holds no studies yet"):
        reporting.open_results(database_url)
    assert inspect(engine).get_table_names() == ["customers"]
    engine.dispose()


def test_percentile_is_percentile_cont() -> None:
    assert reporting.percentile([], 0.5) is None
    assert reporting.percentile([4.0], 0.95) == 4.0
    assert reporting.percentile([1.0, 2.0, 3.0, 10.0], 0.5) == 2.5
    assert reporting.percentile([1.0, 2.0, 3.0, 10.0], 0.95) == pytest.approx(8.95)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_report_formats(filled: str, tmp_path: Path) -> None:
    base = ["report", "--since", "2024-03-01", "--until", "2024-03-02", "--database-url", filled]
    base += ["--model-version", "m2"]
    table = invoke(*base)
    assert table.exit_code == 0, table.output
    assert "received" in table.stdout and "2024-03-02" in table.stdout
    assert "2024-03-06" not in table.stdout

    as_json = invoke(*base, "--format", "json")
    data = json.loads(as_json.stdout)
    assert data["period"] == {"since": "2024-03-01", "until": "2024-03-02"}
    assert [d["day"] for d in data["daily"]] == ["2024-03-01", "2024-03-02"]
    assert data["model_versions"] == ["m2"]
    assert data["totals"]["received"] == sum(d["received"] for d in data["daily"])
    assert sum(data["probability_histogram"]["counts"]) == data["totals"]["screened"]

    out = tmp_path / "daily.csv"
    as_csv = invoke(*base, "--format", "csv", "--out", str(out))
    assert as_csv.exit_code == 0 and "wrote csv report" in as_csv.stderr
    daily = list(csv.DictReader(out.open()))
    assert [(d["day"], d["model_version"]) for d in daily] == [
        (x["day"], x["model_version"]) for x in data["daily"]
    ]
    assert sum(int(d["screened"]) for d in daily) == data["totals"]["screened"]


def test_cli_export(filled: str, tmp_path: Path) -> None:
    out = tmp_path / "handoff.csv"
    done = invoke("export", "--since", "2024-03-02", "--out", str(out), "--database-url", filled)
    assert done.exit_code == 0, done.output
    exported = list(csv.DictReader(out.open()))
    assert exported and list(exported[0]) == list(reporting.EXPORT_COLUMNS)
    assert "patient_ref" not in out.read_text() and "ref1.2" not in out.read_text()
    assert all(r["finished_at"] >= "2024-03-02T00:00:00+00:00" for r in exported)
    assert {r["status"] for r in exported} <= {"screened", "rejected", "failed"}
    finished = [r["finished_at"] for r in exported]
    assert finished == sorted(finished)
    as_json = invoke("export", "--since", "2024-03-02", "-f", "json", "--database-url", filled)
    assert len(json.loads(as_json.stdout)) == len(exported)


M1 = ("--model-version", "m1")


def test_a_report_covers_one_model_version_of_several(filled: str) -> None:
    """Summed over versions, a study re-screened by a new model (or failed for the version
    it was queued for) counts twice, and the positivity mixes two thresholds."""
    engine = reporting.open_results(filled)
    try:
        everything = reporting.Period(None, None)
        assert reporting.model_version_to_report(engine, everything, "m2") == "m2"
        with pytest.raises(reporting.ReportError, match=r"2 model versions \(m1, m2\)"):
            reporting.model_version_to_report(engine, everything, "cxr-compact-1.1.0")
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM studies WHERE model_version = 'm1'"))
        assert reporting.model_version_to_report(engine, everything, None) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (
            ["report", "--database-url", "sqlite:////nonexistent/results.db"],
            2,
            "no results database at",
        ),
        (["report", "--database-url", "nosuchdb://x"], 2, "invalid database URL"),
        # usage errors were Typer's box of usage lines
        (["report", "--since", "2024-13-01"], 2, "Invalid value for '--since'"),
        (["export"], 2, "Missing option '--since' (see python -m worker export --help)"),
        (
            ["report", "--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/none"],
            2,
            "cannot connect to postgresql+psycopg://nobody@127.0.0.1:1/none",
        ),
        (["report", "--since", "2024-03-05", "--until", "2024-03-01"], 2, "is after --until"),
        (["report", "--since", "2030-01-01"], 1, "nothing to report: no results since 2030-01-01"),
        (["export", "--since", "2030-01-01"], 1, "no study finished since 2030-01-01"),
        (["report", "-f", "csv", "-o", "/nonexistent/folder/r.csv", *M1], 2, "no such folder"),
        (["report", "-f", "csv", "-o", "/tmp", *M1], 2, "--out names a folder, not a file: /tmp"),
        # a folder nobody can create files in (a read-only mount; /proc even for root)
        (
            ["export", "--since", "2024-03-01", "-o", "/proc/r.csv"],
            2,
            "cannot write /proc/r.csv: No such file or directory",
        ),
        (
            ["report", "-o", "/nonexistent/a[/]b/r.csv", *M1],
            2,
            "no such folder for --out: /nonexistent/a[/]b",
        ),
        (
            ["report"],
            2,
            "all time holds results of 2 model versions (m1, m2): choose one with --model-version",
        ),
        # a typo was exit 1, "nothing to report": a quiet day to a cron job
        (
            ["report", "--model-version", "m3"],
            2,
            "no results of model version 'm3' in the database (it holds m1, m2)",
        ),
    ],
)
def test_cli_errors_are_one_clear_line(
    filled: str, args: list[str], status: int, message: str
) -> None:
    if "--database-url" not in args:
        args = [*args, "--database-url", filled]
    done = subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# --- the HTML page ---------------------------------------------------------------------


def html_report(url: str, tmp_path: Path, *options: str) -> Path:
    out = tmp_path / "report.html"
    done = invoke("report", "--format", "html", "--out", str(out), "--database-url", url, *options)
    assert done.exit_code == 0, done.output
    return out


def test_html_report_is_self_contained(filled: str, tmp_path: Path) -> None:
    page = html_report(filled, tmp_path, *M1).read_text()
    assert page.count('<img class="chart"') == 3
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert sources and all(s.startswith("data:image/svg+xml;base64,") for s in sources)
    assert "url(" not in page and "@import" not in page and "<script" not in page
    assert f'content="{reporting.CSP}"' in page
    for encoded in sources:
        svg = base64.b64decode(encoded.split(",", 1)[1]).decode()
        assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
        assert not re.search(r"""href\s*=\s*["'](?!#)""", svg), "an SVG refers outside itself"
    assert "ACC-" not in page and "ref1.2" not in page, "aggregates only, no identifiers"


def test_html_report_of_a_period_with_nothing_screened(sqlite_url: str, tmp_path: Path) -> None:
    """A day of CT and MR only: the positivity axis had no rate to scale to (TypeError)."""
    fill(sqlite_url, [study(f"1.3.{i}", "rejected", at(DAY1, 9), 2.0) for i in range(3)])
    page = html_report(sqlite_url, tmp_path).read_text()
    assert page.count('<img class="chart"') == 3


def test_out_keeps_permissions_and_links(tmp_path: Path) -> None:
    """The file was made 0644 whatever the umask (accession numbers readable by all), an
    existing file's mode was reset, and a link to the file was replaced by a copy."""
    private = tmp_path / "private.csv"
    old_umask = os.umask(0o077)
    try:
        reporting.write_text("new\n", private)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    private.chmod(0o640)
    reporting.write_text("again\n", private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o640
    link = tmp_path / "latest.csv"
    link.symlink_to(private)
    reporting.write_text("through the link\n", link)
    assert link.is_symlink() and private.read_text() == "through the link\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.csv", "private.csv"]


@pytest.mark.parametrize("command", ["report", "export"])
def test_out_dev_stdout_writes_to_a_pipe_and_appends_to_a_log(
    filled: str, tmp_path: Path, command: str
) -> None:
    """On a pipe ``-o /dev/stdout`` failed ("No such file or directory"), and after
    ``>> log`` it replaced the log with the export."""
    args = [sys.executable, "-m", "worker", command, "-f", "csv", "-o", "/dev/stdout"]
    args += ["--since", "2024-03-01", "--until", "2024-03-02", "--database-url", filled]
    args += list(M1) if command == "report" else []
    piped = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    header = piped.stdout.splitlines()[0]
    assert header.startswith("study_instance_uid," if command == "export" else "day,"), header
    log = tmp_path / "nightly.log"
    log.write_text("earlier night\n")
    with log.open("a") as stdout:
        appended = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, timeout=120)
    assert appended.returncode == 0, appended.stderr
    assert log.read_text() == "earlier night\n" + piped.stdout
    # `> both.log 2>&1`, and /dev/stderr sent to a file: opened a second time, the file's
    # own position wrote the report over by the status line (or the line over the report)
    both = tmp_path / "both.log"
    with both.open("w") as stream:
        shared = subprocess.run(args, stdout=stream, stderr=stream, timeout=120)
    assert shared.returncode == 0 and piped.stdout in both.read_text(), both.read_text()
    errors = tmp_path / "stderr.log"
    with errors.open("w") as stream:
        to_stderr = [*args[:7], "/dev/stderr", *args[8:]]
        done = subprocess.run(to_stderr, stdout=subprocess.PIPE, stderr=stream, timeout=120)
    assert done.returncode == 0 and errors.read_text().startswith(piped.stdout), errors.read_text()


@pytest.mark.parametrize(
    ("name", "stream"),
    [
        ("/dev/stdout", True),
        ("/dev/fd/63", True),
        ("/proc/self/fd/1", True),
        ("/dev/null", True),
        ("/proc/r.csv", False),
        ("/dev/shm/r.csv", False),
        ("/dev/stdout.csv", False),
    ],
)
def test_only_descriptors_and_devices_are_written_in_place(name: str, stream: bool) -> None:
    """A report in /dev/shm is a file: replaced whole, not appended to."""
    assert reporting.names_a_stream(Path(name)) is stream


def test_out_path_is_printed_as_given(filled: str, tmp_path: Path) -> None:
    """A folder named "[old] reports" vanished from the message; "[/]" raised MarkupError."""
    folder = tmp_path / "[old] reports" / "a[/]b"
    folder.mkdir(parents=True)
    out = folder / "r.csv"
    done = invoke("report", "-f", "csv", "-o", str(out), "--database-url", filled, *M1)
    assert done.exit_code == 0, done.output
    assert f"wrote csv report to {out}:" in " ".join(done.stderr.split())
    assert out.is_file()


def test_html_without_matplotlib_is_one_clear_line(
    filled: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker install (and image) has no matplotlib: say so, keep the other formats."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = str(tmp_path / "r.html")
    done = invoke("report", "-f", "html", "-o", out, "--database-url", filled, *M1)
    assert done.exit_code == 2
    assert "html reports need matplotlib" in done.stderr and not (tmp_path / "r.html").exists()
    assert invoke("report", "-f", "json", "--database-url", filled, *M1).exit_code == 0


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"Chromium not installed at {CHROMIUM} (apt-get install -y chromium; .ci/run does this)"
        )
    profile = tmp_path / "chromium-profile"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,2400",
        "--virtual-time-budget=10000",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


MEASURE = """<script>
window.addEventListener("load", () => {
  const charts = [...document.querySelectorAll("img.chart")].map((img) => {
    const box = img.getBoundingClientRect();
    return {id: img.id, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
            shown: [Math.round(box.width), Math.round(box.height)]};
  });
  const out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify(charts);
  document.body.appendChild(out);
});
</script>
"""


@pytest.mark.services
def test_html_report_renders_its_charts_in_chromium(
    database_url: str, dicom_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium not installed at {CHROMIUM} (apt-get install -y chromium)")
    run([dicom_dir / "cxr"], Settings(database_url=database_url, model=model_dir, workers=2))
    page = html_report(database_url, tmp_path)
    # The page allows no script; the measuring copy allows only its own inline one.
    original = page.read_text()
    assert reporting.CSP in original
    probe = tmp_path / "probe.html"
    probe.write_text(
        original.replace(reporting.CSP, reporting.CSP + "; script-src 'unsafe-inline'").replace(
            "</body>", MEASURE + "</body>"
        )
    )
    dom = chromium("--dump-dom", probe.as_uri(), tmp_path=tmp_path).stdout
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, "the page did not finish loading"
    charts = json.loads(found.group(1).replace("&amp;", "&").replace("&lt;", "<"))
    assert [c["id"] for c in charts] == ["chart-volume", "chart-probabilities", "chart-reasons"]
    for chart in charts:
        assert chart["complete"], chart
        assert min(chart["natural"]) > 100 and min(chart["shown"]) > 100, chart

    # The page itself, as a person sees it: not blank, with the charts' colours.
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", page.as_uri(), tmp_path=tmp_path)
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2400)
    colours = image.getcolors(maxcolors=1 << 20) or []
    inked = sum(n for n, rgb in colours if rgb != (255, 255, 255))
    assert inked > 0.03 * image.size[0] * image.size[1], "the page is (nearly) blank"
    screened_blue = sum(
        n for n, (r, g, b) in colours if abs(r - 76) + abs(g - 114) + abs(b - 176) < 12
    )
    assert screened_blue > 500, "the volume chart's bars are not drawn"


@pytest.mark.parametrize(
    ("last", "unit", "bars", "first_bar"),
    [
        (dt.date(2024, 5, 31), "day", 92, dt.date(2024, 3, 1)),
        (dt.date(2024, 6, 1), "week", 14, dt.date(2024, 2, 26)),
        (dt.date(2026, 3, 1), "week", 105, dt.date(2024, 2, 26)),
        (dt.date(2026, 11, 27), "month", 33, dt.date(2024, 3, 1)),
    ],
)
def test_the_volume_chart_has_a_bar_per_day_week_or_month_by_the_span(
    last: dt.date, unit: str, bars: int, first_bar: dt.date
) -> None:
    """A bar per day of an all-time report of three years was a 1 MB page of bars
    thinner than a pixel."""
    found_unit, slots = reporting.volume_slots(dt.date(2024, 3, 1), last)
    assert (found_unit, len(slots), slots[0]) == (unit, bars, first_bar)
    assert slots[-1] <= last < slots[-1] + dt.timedelta(days=31 if unit == "month" else 7)
    assert slots == sorted(set(slots))


def test_chromium_skips_clearly_when_absent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    with pytest.raises(pytest.skip.Exception, match="Chromium not installed"):
        chromium("--version", tmp_path=tmp_path)


def test_export_csv_keeps_one_row_per_record_whatever_the_reason_holds() -> None:
    names = ["scan\r1.dcm", "line\nbreak.dcm", 'comma, "quote".dcm', "plain.dcm"]
    records = [
        {column: name if column == "reason" else None for column in reporting.EXPORT_COLUMNS}
        for name in names
    ]
    content, count = reporting.render_export(iter(records), "csv")
    read = list(csv.DictReader(io.StringIO(content, newline="")))
    assert count == len(read) == len(names)
    assert [row["reason"] for row in read] == names
