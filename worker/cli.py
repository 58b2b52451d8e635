"""The ``cxr-screen`` command line."""

from __future__ import annotations

import signal
import sys
import traceback
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from db.session import make_engine, safe_url, upgrade
from training.cli import ensemble_command, evaluate_command, predict_command, train_command
from worker.cli_common import (
    DatabaseUrl,
    ExportPaths,
    ModelDir,
    console,
    existing_paths,
    progress_bars,
    settings_from,
    show_error,
    user_errors,
)
from worker.cli_queue import register as register_queue
from worker.cli_report import register as register_report
from worker.privacy import privacy_warning

EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error

app = typer.Typer(
    help="Screen chest radiographs (DICOM) for COVID-19 findings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Results database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.command()
@user_errors
def run(
    paths: ExportPaths,
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
    exports = existing_paths(paths)
    if warning := privacy_warning(settings):
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill <pid>` stops the pool as Ctrl-C does
    with progress_bars() as bars:
        scan = bars.add_task("reading headers", total=None)
        screen = bars.add_task("screening studies", total=None)
        hooks = RunProgress(
            on_file=lambda _: bars.advance(scan),
            on_discovered=lambda n: bars.update(screen, total=n),
            on_study=lambda _: bars.advance(screen),
        )
        try:
            summary = run_screening(exports, settings, hooks)
        except KeyboardInterrupt:
            bars.stop()
            console.print(
                "interrupted: the studies finished so far are saved; run the same command "
                "again to finish (it screens every study again)"
            )
            raise typer.Exit(130) from None
        bars.update(scan, total=summary.files)
    if summary.files == 0:
        console.print("[yellow]warning:[/yellow] no file under the given paths (not mounted?)")
    elif summary.studies == 0:
        console.print("[yellow]warning:[/yellow] no DICOM study found under the given paths")
    where = escape(safe_url(settings.database_url))
    table = Table(title=f"cxr-screen run ({where}), {summary.seconds:.1f} s")
    # "files rejected": before any study (not DICOM, no UIDs); the rest count studies.
    columns = ("files", "files rejected", "studies", "screened", "rejected", "failed", "positive")
    for column in columns:
        table.add_column(column, justify="right")
    counts = (
        summary.files,
        summary.rejected_files,
        summary.studies,
        summary.screened,
        summary.rejected,
        summary.failed,
        summary.positives,
    )
    table.add_row(*map(str, counts))
    Console().print(table)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@db_app.command("upgrade")
@user_errors
def db_upgrade(database_url: DatabaseUrl = None) -> None:
    """Create or upgrade the results tables (run and the worker also do this themselves)."""
    settings = settings_from(database_url=database_url)
    upgrade(make_engine(settings.database_url))
    console.print(f"database {escape(safe_url(settings.database_url))} is at the latest schema")


def main() -> None:
    """``cxr-screen``. A usage error (an unknown option, a bad date, a missing argument) is
    one line on stderr with exit status 2, as every other error is, where Typer prints a
    box of usage lines into the cron mail or the log."""
    try:
        status = app(standalone_mode=False)
    except typer.TyperException as exc:  # Click's errors, as Typer carries them
        # Typer has printed the help already (its own test of the class, by name)
        if type(exc).__name__ != "NoArgsIsHelpError":
            show_error(usage_error(exc))
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        show_error("aborted")
        sys.exit(1)
    except Exception:
        # A bug: the traceback, and a status of its own, since exit 1 means "nothing to
        # report" to a cron job.
        traceback.print_exc()
        show_error("unexpected error: this is a bug in cxr-screen (the traceback above)")
        sys.exit(EXIT_BUG)
    sys.exit(status if isinstance(status, int) else 0)


def usage_error(exc: typer.TyperException) -> str:
    context = getattr(exc, "ctx", None)
    if context is None:
        return exc.format_message()
    return f"{exc.format_message().rstrip('.')} (see {context.command_path} --help)"


register_queue(app)
register_report(app)
# Training commands import TensorFlow inside the command only; the worker starts light.
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("predict")(predict_command)
app.command("ensemble")(ensemble_command)
