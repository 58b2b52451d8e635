"""The one settings object: environment, settings file, precedence."""

from __future__ import annotations

import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import (
    DEFAULT_MODEL,
    Settings,
    SettingsError,
    data_roots,
    find_default_model,
    get_settings,
)


@pytest.fixture()
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def name_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "cxr.env"
    path.write_text(text)
    monkeypatch.setenv("CXR_SETTINGS_FILE", str(path))


def test_the_settings_file_is_read_when_named_after_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    name_settings_file(tmp_path, monkeypatch, "CXR_BATCH_SIZE=3\nCXR_LOG_LEVEL=DEBUG\n")
    monkeypatch.delenv("CXR_BATCH_SIZE", raising=False)
    monkeypatch.setenv("CXR_LOG_LEVEL", "WARNING")  # the environment wins over the file
    settings = get_settings()
    assert (settings.batch_size, settings.log_level) == (3, "WARNING")


@pytest.mark.parametrize(
    ("given", "level"), [("info", "INFO"), ("warn", "WARNING"), ("FATAL", "CRITICAL")]
)
def test_log_levels_are_the_names_logging_accepts(given: str, level: str) -> None:
    assert Settings(log_level=given).log_level == level


def test_an_unknown_log_level_is_refused() -> None:
    with pytest.raises(ValueError, match="not a log level"):
        Settings(log_level="verbose")


@pytest.mark.parametrize(("key", "default"), [("change-me", True), ("", True), ("s3cret", False)])
def test_the_published_or_an_empty_hash_key_is_flagged(key: str, default: bool) -> None:
    assert Settings(hash_key=key).hash_key_is_default is default
    assert Settings(hash_key=key, patient_id_mode="none").hash_key_is_default is False


@pytest.mark.parametrize(
    "setting",
    [
        {"threshold": 5.0},  # every film `normal`, stored as if it were a threshold
        {"threshold": float("nan")},  # every film `normal`, stored as null
        {"threshold": 0.0},
        {"workers": -3},  # the process pool's traceback
        {"batch_size": 0},
        {"task_max_retries": -1},
        {"metrics_port": 70000},
    ],
)
def test_a_value_that_cannot_work_is_refused_from_the_environment_and_the_command_line(
    setting: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    ((name, value),) = setting.items()
    monkeypatch.setenv(f"CXR_{name.upper()}", str(value))
    with pytest.raises(ValidationError, match=name):
        Settings()
    monkeypatch.delenv(f"CXR_{name.upper()}")
    with pytest.raises(SettingsError, match=f"^--{name.replace('_', '-')}: "):
        Settings().with_overrides(**setting)


@pytest.mark.parametrize("value", ["nan", "NaN", "inf"])
def test_a_threshold_that_is_not_a_number_is_called_so(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was refused as "Input should be less than 1"."""
    monkeypatch.setenv("CXR_THRESHOLD", value)
    with pytest.raises(ValidationError, match="Input should be a finite number"):
        Settings()


@pytest.mark.parametrize(
    ("mode", "key", "warning"),
    [
        ("hash", "change-me", "CXR_HASH_KEY is the published default"),
        ("hash", "", "CXR_HASH_KEY is empty (an unset variable?)"),
        ("hash", "x", "CXR_HASH_KEY has 1 characters: a short key can be guessed"),
        ("hash", "changeme", "CXR_HASH_KEY has 8 characters"),
        ("clear", "0" * 64, "CXR_PATIENT_ID_MODE=clear: patient IDs are stored in clear"),
        ("hash", "0123456789abcdef", None),
        ("none", "x", None),
    ],
)
def test_the_operator_hears_how_patient_ids_will_be_stored(
    mode: str, key: str, warning: str | None
) -> None:
    """A one-letter key or clear mode started without a word."""
    from worker.privacy import privacy_warning

    found = privacy_warning(Settings(patient_id_mode=mode, hash_key=key))
    assert (found is None) if warning is None else (found or "").startswith(warning)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "CXR_SETTINGS_FILE: no such file"),
        ("folder", "CXR_SETTINGS_FILE: no such file"),
        ("CXR_DATABSE_URL=sqlite:///x.db\n", "no such setting: CXR_DATABSE_URL"),
    ],
)
def test_a_settings_file_that_is_missing_or_names_no_setting_is_refused(
    content: str | None,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fresh_settings: None,
) -> None:
    """Each left every default in force: a database in the current folder, the
    published hash key."""
    path = tmp_path / "cxr.env"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    monkeypatch.setenv("CXR_SETTINGS_FILE", str(path))
    with pytest.raises(SettingsError, match=message):
        get_settings()


def test_a_settings_file_may_hold_other_programs_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    name_settings_file(tmp_path, monkeypatch, "POSTGRES_PASSWORD=x\ncxr_workers=3\n")
    monkeypatch.delenv("CXR_WORKERS", raising=False)
    assert get_settings().workers == 3


@pytest.mark.parametrize(
    "name", ["CXR_DATABASE_URL", "CXR_BROKER_URL", "CXR_MODEL", "CXR_INGEST_ROOT"]
)
def test_an_empty_url_or_folder_is_refused_not_read_as_the_current_folder(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty CXR_INGEST_ROOT was ".", an empty broker URL an AMQP broker on localhost."""
    monkeypatch.setenv(name, "  ")
    with pytest.raises(ValidationError, match="empty"):
        Settings()


def test_a_broker_url_without_a_scheme_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_BROKER_URL", "queue-host:6379/0")
    with pytest.raises(ValidationError, match="not a URL"):
        Settings()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("REDIS://:s3cret@h:6379/0", "not a Redis URL (REDIS://)"),
        ("redis://:s3cret@h:port/0", "the port is a number"),
        ("sentinel://:s3cret@h:26379", "not a Redis URL (sentinel://)"),
        ("redis+socket:///run/redis.sock", "not a Redis URL (redis+socket://)"),
        ("redis://:s3cret@a:6379/0;redis://b:6379/0", "the Redis database is a number"),
        ("amqp://guest:s3cret@h//", "not a Redis URL (amqp://)"),
    ],
)
def test_a_broker_url_redis_py_cannot_read_is_refused_without_its_password(
    url: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """status, requeue and the queue-depth metric read the queue with redis-py; plain
    ``celery -A`` printed pydantic's error with the URL, password included."""
    monkeypatch.setenv("CXR_BROKER_URL", url)
    with pytest.raises(ValidationError, match=re.escape(why)) as refused:
        Settings()
    assert "s3cret" not in str(refused.value)


def test_values_are_taken_without_surrounding_spaces_and_folders_with_home(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``"sqlite:///r.db "`` created a database file whose name ends in a space."""
    monkeypatch.setenv("CXR_DATABASE_URL", "sqlite:////tmp/r.db ")
    monkeypatch.setenv("CXR_WORKERS", " 2 ")
    monkeypatch.setenv("CXR_MODEL", "~/models/cxr")
    settings = Settings()
    assert settings.database_url == "sqlite:////tmp/r.db"
    assert settings.workers == 2
    assert settings.model == Path.home() / "models" / "cxr"


def shipped_at(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_card.json").write_text("{}")
    return folder


def test_the_default_model_is_the_repository_folder_in_a_checkout(tmp_path: Path) -> None:
    checkout = tmp_path / "repo" / "models" / "cxr-compact"
    checkout.mkdir(parents=True)
    shipped_at(tmp_path / "venv" / "share" / "cxr-screen" / "models" / "cxr-compact")
    assert find_default_model(tmp_path / "repo", [tmp_path / "venv"]) == checkout


def test_a_wheel_install_finds_the_model_in_its_data_folder(tmp_path: Path) -> None:
    """Installed from a wheel, the code is in site-packages and the model (data-files) in
    <prefix>/share/cxr-screen: site-packages/models/cxr-compact is not there."""
    site_packages = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site_packages.mkdir(parents=True)
    user = shipped_at(tmp_path / "home" / "share" / "cxr-screen" / "models" / "cxr-compact")
    assert find_default_model(site_packages, [tmp_path / "venv", tmp_path / "home"]) == user
    prefix = shipped_at(tmp_path / "venv" / "share" / "cxr-screen" / "models" / "cxr-compact")
    assert find_default_model(site_packages, [tmp_path / "venv", tmp_path / "home"]) == prefix


def test_without_a_model_the_default_names_the_install_location(tmp_path: Path) -> None:
    found = find_default_model(tmp_path / "site-packages", [tmp_path / "venv"])
    assert found == tmp_path / "venv" / "share" / "cxr-screen" / "models" / "cxr-compact"


def test_the_default_model_is_absolute_and_the_data_folders_are_this_environments() -> None:
    assert DEFAULT_MODEL.is_absolute()
    assert data_roots()[0] == Path(sysconfig.get_path("data"))
