"""What every ``cxr-screen`` command shares: options, settings, the error policy."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from config.settings import Settings, get_settings
from db.session import DatabaseError
from worker.errors import UserError
from worker.logs import configure_logging

console = Console(stderr=True)
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
        except (UserError, DatabaseError, OSError) as exc:
            fail(str(exc))
        except ValidationError as exc:
            fail(setting_errors(exc))
        except ModuleNotFoundError as exc:
            if exc.name not in TRAINING_MODULES:
                raise
            fail(f"this command needs the training extra (pip install 'cxr-screen[train]'): {exc}")

    return wrapper  # type: ignore[return-value]


# Installed by the [train] extra only; the worker install (and its image) has none.
TRAINING_MODULES = frozenset({"tensorflow", "keras", "sklearn", "matplotlib"})


def fail(message: str) -> NoReturn:
    # Values are escaped: a path or a reason may hold "[...]", which rich reads as markup.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def setting_errors(exc: ValidationError) -> str:
    """``CXR_BATCH_SIZE: Input should be a valid integer``, one per bad setting."""
    return "; ".join(
        f"CXR_{str(error['loc'][0]).upper()}: {error['msg']}" if error["loc"] else error["msg"]
        for error in exc.errors()
    )


def settings_from(**overrides: Any) -> Settings:
    settings = get_settings().with_overrides(**overrides)
    configure_logging("WARNING" if sys.stderr.isatty() else settings.log_level, settings.log_json)
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


def progress_bars() -> Progress:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console)
