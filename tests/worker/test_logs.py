"""Log lines: JSON fields and time stamps."""

from __future__ import annotations

import json
import logging

from worker.logs import JsonFormatter, describe_error


def test_json_lines_carry_utc_time_with_its_offset_and_milliseconds() -> None:
    """Collectors merge lines from machines in different zones: a local time without an
    offset cannot be placed."""
    record = logging.LogRecord("worker", logging.INFO, __file__, 1, "study %s", ("1.2.3",), None)
    record.created = 1_795_800_000.25
    line = json.loads(JsonFormatter().format(record))
    assert line["time"] == "2026-11-27T17:20:00.250+00:00"
    assert (line["level"], line["message"]) == ("INFO", "study 1.2.3")


def test_a_file_error_is_described_without_its_file_names() -> None:
    missing = FileNotFoundError(2, "No such file or directory", "/exports/DOE^JANE/1.dcm")
    moved = OSError(18, "Invalid cross-device link", "/exports/DOE^JANE/a", "/tmp/b")
    for error in (missing, moved):
        text = describe_error(error)
        assert "DOE^JANE" not in text and "/tmp/b" not in text
        assert text == f"{type(error).__name__}: {error.strerror}"
    assert describe_error(OSError("broker refused")) == "OSError: broker refused"
