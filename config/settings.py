"""The one settings object. Every setting is documented here and in the README.

Precedence, highest first: command-line flags (applied by the CLI through
``Settings.with_overrides``), environment variables ``CXR_*``, the settings file named
by ``CXR_SETTINGS_FILE`` (a ``KEY=value`` env file), then the defaults below.
"""

from __future__ import annotations

import os
import re
import site
import sysconfig
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "cxr-compact"
# Where a wheel install puts the shipped model, under the environment's data folder
# (pyproject.toml [tool.setuptools.data-files]).
INSTALLED_MODELS = Path("share") / "cxr-screen" / "models"


def data_roots() -> list[Path]:
    """The data folders a wheel install may have written to: the environment's (a venv,
    the system prefix), then the user scheme's (``pip install --user``) when enabled."""
    roots = [Path(sysconfig.get_path("data"))]
    if site.ENABLE_USER_SITE:
        roots.append(Path(sysconfig.get_path("data", sysconfig.get_preferred_scheme("user"))))
    return roots


def find_default_model(repo_root: Path = REPO_ROOT, roots: Sequence[Path] | None = None) -> Path:
    """The shipped model folder: the repository's ``models/cxr-compact`` when it is there
    (a checkout, an editable install), else the copy a wheel install put under a data
    folder (``<prefix>/share/cxr-screen/models/cxr-compact``). When neither is found,
    the first installed location, so that the error names where the model belongs.
    Absolute, whatever the current folder."""
    checkout = repo_root / "models" / MODEL_NAME
    if checkout.is_dir():
        return checkout.absolute()
    installed = [
        root / INSTALLED_MODELS / MODEL_NAME for root in (data_roots() if roots is None else roots)
    ]
    for folder in installed:
        if (folder / "model_card.json").is_file():
            return folder.absolute()
    return (installed[0] if installed else checkout).absolute()


DEFAULT_MODEL = find_default_model()
DEFAULT_MAX_PIXELS = 50_000_000
BROKER_SCHEMES = ("redis", "rediss")
FLAG_NAMES = {"log_level": "--loglevel"}  # the worker's flag, as Celery spells it
DEFAULT_HASH_KEY = "change-me"
LOG_LEVEL_ALIASES = {"WARN": "WARNING", "FATAL": "CRITICAL"}  # what logging also accepts
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PREFIX = "CXR_"


class SettingsError(ValueError):
    """A settings file, or a command-line flag, that cannot be used."""


class Settings(BaseSettings):
    # hide_input_in_errors: a URL's password in a traceback (plain `celery -A ...` prints one)
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", hide_input_in_errors=True)

    database_url: str = Field(
        "sqlite:///cxr-screen.db",
        description="SQLAlchemy URL of the results database "
        "(postgresql+psycopg://user@host/db in production).",
    )
    broker_url: str = Field("redis://localhost:6379/0", description="Celery broker URL.")
    model: Path = Field(DEFAULT_MODEL, description="Model folder (model.tflite + model_card.json).")
    threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        allow_inf_nan=False,
        description="Operating threshold; default: the one in the model card.",
    )
    ingest_root: Path | None = Field(
        None,
        description="Root that queued file paths are stored relative to, so workers "
        "that mount the export elsewhere still find them. Default: absolute paths.",
    )
    workers: int = Field(0, ge=0, description="Processes for `run` (0 = one per core).")
    batch_size: int = Field(16, ge=1, description="Images per inference batch.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Largest Rows*Columns decoded (decompression-bomb guard).",
    )
    patient_id_mode: Literal["hash", "none", "clear"] = Field(
        "hash", description="How patient IDs are stored: keyed hash, not at all, or in clear."
    )
    hash_key: str = Field(DEFAULT_HASH_KEY, description="Secret key of the patient-ID hash.")
    studies_per_message: int = Field(
        8,
        ge=1,
        description="Most studies `ingest` puts in one queue message (fewer when the "
        "ingest is small, ceil(studies / 16) each, so that it still spreads).",
    )
    task_time_limit: int = Field(300, ge=1, description="Hard limit in seconds for one task.")
    task_max_retries: int = Field(5, ge=0, description="Retries of a transient failure.")
    visibility_timeout: int = Field(
        3600, ge=1, description="Redis visibility timeout (s); must exceed the longest task."
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus metrics port for a worker (0 = off)."
    )
    log_json: bool = Field(False, description="Structured JSON logs.")
    log_level: str = Field("INFO", description="Log level.")

    @property
    def hash_key_is_default(self) -> bool:
        """Patient IDs hashed with the published key: anyone can recompute them."""
        return self.patient_id_mode == "hash" and self.hash_key in (DEFAULT_HASH_KEY, "")

    @field_validator("*", mode="before")
    @classmethod
    def _no_blank_text(cls, value: Any, info: ValidationInfo) -> Any:
        """Spaces around a value are a typing slip (``"sqlite:///r.db "`` made a file
        named with the space); an empty URL or folder is an unset variable, which read as
        the current folder or as an AMQP broker on localhost."""
        if not isinstance(value, str):
            return value
        value = value.strip()
        if value == "" and info.field_name in REQUIRED_TEXT:
            raise ValueError("empty (an unset variable?): give a value or leave it out")
        return value

    @field_validator("model", "ingest_root")
    @classmethod
    def _home_expanded(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("broker_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        """Redis only: the queue's status, its depth in the metrics and the redelivery of
        a lost study read Redis. redis-py took ``/abc`` for database 0, kombu refused it
        after ``ingest`` had marked the studies queued."""
        if "://" not in value:
            raise ValueError("not a URL (redis://host:6379/0)")
        scheme = value.split("://", 1)[0]
        if scheme not in BROKER_SCHEMES:  # sentinel://, redis+socket://: redis-py reads neither
            raise ValueError(f"not a Redis URL ({scheme}://): use redis:// or rediss://")
        parts = urlsplit(value)
        if not re.fullmatch(r"/?\d*", parts.path):  # a failover list "...;redis://" too
            raise ValueError("the Redis database is a number (redis://host:6379/0)")
        try:
            parts.port  # noqa: B018 - parsed on access
        except ValueError:
            raise ValueError("the port is a number (redis://host:6379/0)") from None
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = LOG_LEVEL_ALIASES.get(value.upper(), value.upper())
        if level not in LOG_LEVELS:
            raise ValueError(f"not a log level (one of {', '.join(LOG_LEVELS)})")
        return level

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the non-None overrides applied (command-line flags), validated as
        the environment is (a copy with an update would take ``--threshold 5``)."""
        given = {key: value for key, value in overrides.items() if value is not None}
        try:
            return type(self).model_validate({**self.model_dump(), **given})
        except ValidationError as exc:  # named as typed: CXR_THRESHOLD was not set
            raise SettingsError(setting_errors(exc, flag_name)) from None


def flag_name(field: str) -> str:
    """The command-line flag that overrides a setting."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


def variable_name(field: str) -> str:
    return f"{PREFIX}{field.upper()}"


def setting_errors(exc: ValidationError, name: Callable[[str], str] = variable_name) -> str:
    """``CXR_BATCH_SIZE: Input should be a valid integer``, one per bad setting, each
    named by ``name`` (its variable, or the flag that set it)."""
    return "; ".join(
        f"{name(str(error['loc'][0]))}: {message}" if error["loc"] else message
        for error in exc.errors()
        for message in [error["msg"].removeprefix("Value error, ")]
    )


REQUIRED_TEXT = frozenset({"database_url", "broker_url", "model", "ingest_root"})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    # The file is named at call time, not import time: a CLI or test sets it after
    # importing this module.
    name = os.environ.get("CXR_SETTINGS_FILE", "").strip()
    if not name:
        return Settings()
    check_settings_file(Path(name))
    return Settings(_env_file=name)


def check_settings_file(path: Path) -> None:
    """A named settings file must be there, and name only settings that exist: a
    missing file or a misspelt key (``CXR_DATABSE_URL``) left every default in force -
    a database in the current folder, the published hash key."""
    if not path.is_file():
        raise SettingsError(f"CXR_SETTINGS_FILE: no such file: {path}")
    try:
        keys = dotenv_values(path).keys()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"CXR_SETTINGS_FILE: cannot read {path}: {exc}") from exc
    known = {f"{PREFIX}{name}".upper() for name in Settings.model_fields}
    unknown = sorted(k for k in keys if k.upper().startswith(PREFIX) and k.upper() not in known)
    if unknown:
        raise SettingsError(f"{path}: no such setting: {', '.join(unknown)}")
