"""What every ``cxr-screen`` command shares: options, settings, the error policy."""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from config.settings import Settings, SettingsError, get_settings, setting_errors
from db.session import DatabaseError
from worker.errors import UserError
from worker.logs import configure_logging

# soft_wrap: a message is one line in a log or a cron mail, however long
console = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

BrokerUrl = Annotated[str | None, typer.Option("--broker-url", help="Overrides CXR_BROKER_URL.")]
DatabaseUrl = Annotated[
    str | None, typer.Option("--database-url", help="Overrides CXR_DATABASE_URL.")
]
ModelDir = Annotated[
    Path | None, typer.Option("--model", help="Model folder; overrides CXR_MODEL.")
]


def user_errors(function: F) -> F:
    """Errors a person can act on: one clear line and exit status 2, no traceback."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (UserError, DatabaseError, SettingsError, OSError) as exc:
            fail(str(exc))
        except ValidationError as exc:
            fail(setting_errors(exc))
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in TRAINING_MODULES:
                raise
            fail(f"this command needs the training extra (pip install 'cxr-screen[train]'): {exc}")

    return wrapper  # type: ignore[return-value]


# Installed by the [train] extra only; the worker install (and its image) has none.
TRAINING_MODULES = frozenset({"tensorflow", "keras", "sklearn", "matplotlib"})


def fail(message: str) -> NoReturn:
    show_error(message)
    raise typer.Exit(2)


def show_error(message: str) -> None:
    # Values are escaped: a path or a reason may hold "[...]", which rich reads as markup.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


def settings_from(**overrides: Any) -> Settings:
    configured = get_settings()
    settings = configured.with_overrides(**overrides)
    # On a terminal, log lines would break the progress bars: warnings only, unless a
    # level or JSON is asked for (an operator troubleshooting by hand).
    chosen = {"log_level", "log_json"} & configured.model_fields_set
    level = "WARNING" if sys.stderr.isatty() and not chosen else settings.log_level
    configure_logging(level, settings.log_json)
    return settings


ExportPaths = Annotated[list[str], typer.Argument(help="DICOM files, folders or DICOMDIRs.")]


def existing_paths(paths: list[str]) -> list[Path]:
    """The paths, each of which exists. Taken as text: ``Path("")`` would be ".", and an
    unset ``"$EXPORT"`` in a cron line would screen the current folder."""
    if "" in paths:
        raise UserError("an empty path was given (an unset variable?)")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no such file or folder: {', '.join(missing)}")
    return [Path(p) for p in paths]


def progress_bars() -> Progress | ProgressLines:
    """Bars on a terminal; in a log (cron, CI, ``2> file``) a line now and then, where
    bars would show only their last frame, at the end."""
    if not console.is_terminal:
        return ProgressLines(console)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console)


class ProgressLines:
    """The part of rich's Progress the commands use, as one line per task at most every
    ``every`` seconds, and each task's last line when it stops (unless just shown)."""

    def __init__(
        self,
        out: Console,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out, self.every, self.clock = out, every, clock
        self.started = clock()
        self.tasks: list[_LineTask] = []
        self.stopped = False

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, error: type[BaseException] | None, *_: object) -> None:
        if error is None:
            self.stop()
        self.stopped = True  # an error's one line is not preceded by zero counts

    def add_task(self, description: str, total: float | None = None) -> TaskID:
        self.tasks.append(_LineTask(description, total, shown=self.started))
        return TaskID(len(self.tasks) - 1)

    def update(self, task_id: TaskID, total: float | None = None) -> None:
        self.tasks[task_id].total = total

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.done += advance
        if self.clock() - task.shown >= self.every:
            self._show(task)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            for task in self.tasks:
                if task.shown_as != (task.done, task.total):
                    self._show(task)

    def _show(self, task: _LineTask) -> None:
        now = self.clock()
        task.shown, task.shown_as = now, (task.done, task.total)
        total = "" if task.total is None else f"/{task.total:,.0f}"
        elapsed = dt.timedelta(seconds=round(now - self.started))
        line = f"{task.description}: {task.done:,.0f}{total} ({elapsed})"
        self.out.print(line, markup=False, highlight=False)


@dataclass
class _LineTask:
    description: str
    total: float | None
    shown: float
    done: float = 0
    shown_as: tuple[float, float | None] | None = None
