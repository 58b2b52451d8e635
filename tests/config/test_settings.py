"""The one settings object: environment, settings file, precedence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from config.settings import get_settings


@pytest.fixture()
def fresh_settings() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_the_settings_file_is_read_when_named_after_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    settings_file = tmp_path / "cxr.env"
    settings_file.write_text("CXR_BATCH_SIZE=3\nCXR_LOG_LEVEL=DEBUG\n")
    monkeypatch.delenv("CXR_BATCH_SIZE", raising=False)
    monkeypatch.setenv("CXR_SETTINGS_FILE", str(settings_file))
    monkeypatch.setenv("CXR_LOG_LEVEL", "WARNING")  # the environment wins over the file
    settings = get_settings()
    assert (settings.batch_size, settings.log_level) == (3, "WARNING")
