"""The ``cxr-screen`` command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config.settings import Settings, get_settings
from db.session import DatabaseError, make_engine, safe_url, upgrade
from worker.logs import configure_logging
from worker.model import ModelError

app = typer.Typer(
    help="Screen chest radiographs (DICOM) for COVID-19 findings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Results database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console(stderr=True)

DatabaseUrl = Annotated[
    str | None, typer.Option("--database-url", help="Overrides CXR_DATABASE_URL.")
]
ModelDir = Annotated[
    Path | None, typer.Option("--model", help="Model folder; overrides CXR_MODEL.")
]
F = TypeVar("F", bound=Callable[..., Any])


def user_errors(function: F) -> F:
    """Errors a person can act on: one clear line and exit status 2, no traceback."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (DatabaseError, ModelError, FileNotFoundError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def settings_from(**overrides: Any) -> Settings:
    settings = get_settings().with_overrides(**overrides)
    configure_logging("WARNING" if sys.stderr.isatty() else settings.log_level, settings.log_json)
    return settings


@app.command()
@user_errors
def run(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files, folders or DICOMDIRs.")],
    database_url: DatabaseUrl = None,
    model: ModelDir = None,
    workers: Annotated[int | None, typer.Option(help="Processes (default: one per core).")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Overrides the model's threshold.")
    ] = None,
) -> None:
    """Screen every study under PATHS in-process and write the results tables."""
    from worker.runner import Progress as RunProgress
    from worker.runner import run as run_screening

    settings = settings_from(
        database_url=database_url, model=model, workers=workers, threshold=threshold
    )
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        scan = bars.add_task("reading headers", total=None)
        screen = bars.add_task("screening studies", total=None)
        hooks = RunProgress(
            on_file=lambda _: bars.advance(scan),
            on_discovered=lambda n: bars.update(screen, total=n),
            on_study=lambda _: bars.advance(screen),
        )
        summary = run_screening(paths, settings, hooks)
        bars.update(scan, total=summary.files)
    if summary.studies == 0 and summary.rejected_files == summary.files:
        console.print("[yellow]warning:[/yellow] no DICOM study found under the given paths")
    table = Table(title=f"cxr-screen run ({safe_url(settings.database_url)})")
    for column in ("files", "studies", "screened", "rejected", "failed", "positive", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(
        *(
            str(v)
            for v in (
                summary.files,
                summary.studies,
                summary.screened,
                summary.rejected,
                summary.failed,
                summary.positives,
                f"{summary.seconds:.1f}",
            )
        )
    )
    Console().print(table)


@db_app.command("upgrade")
@user_errors
def db_upgrade(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the results tables (run and the worker also do this themselves)."""
    settings = settings_from(database_url=database_url)
    upgrade(make_engine(settings.database_url))
    console.print(f"database {safe_url(settings.database_url)} is at the latest schema")


def main() -> None:
    app()


# The distributed commands (ingest, worker, status, requeue) live in their own module;
# registered here, after `app` and `user_errors` exist, so there is no import cycle.
from worker.cli_queue import register as _register_queue  # noqa: E402

_register_queue(app)

# `report` and `export` (worker/cli_report.py), registered after `app` and `user_errors`
# exist, so there is no import cycle.
from worker.cli_report import register as _register_report  # noqa: E402

_register_report(app)
