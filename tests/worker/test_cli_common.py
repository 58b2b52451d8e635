"""What the commands share: progress for logs."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from worker.cli_common import ProgressLines


def test_progress_in_a_log_is_a_line_per_interval_and_a_last_line() -> None:
    """Under cron or CI the bars showed nothing until the end of an overnight run."""
    now = [0.0]
    out = io.StringIO()
    with ProgressLines(Console(file=out, width=200), every=30, clock=lambda: now[0]) as lines:
        scan = lines.add_task("reading headers")
        screen = lines.add_task("screening studies")
        for _ in range(1200):
            now[0] += 0.125
            lines.advance(scan)
        lines.update(screen, total=3000)
        for _ in range(3000):
            now[0] += 0.0625
            lines.advance(screen)
    assert out.getvalue().splitlines() == [
        "reading headers: 240 (0:00:30)",
        "reading headers: 480 (0:01:00)",
        "reading headers: 720 (0:01:30)",
        "reading headers: 960 (0:02:00)",
        "reading headers: 1,200 (0:02:30)",
        "screening studies: 1/3,000 (0:02:30)",
        "screening studies: 481/3,000 (0:03:00)",
        "screening studies: 961/3,000 (0:03:30)",
        "screening studies: 1,441/3,000 (0:04:00)",
        "screening studies: 1,921/3,000 (0:04:30)",
        "screening studies: 2,401/3,000 (0:05:00)",
        "screening studies: 2,881/3,000 (0:05:30)",
        "screening studies: 3,000/3,000 (0:05:38)",
    ]


def test_a_task_that_never_moved_still_gets_its_line() -> None:
    out = io.StringIO()
    with ProgressLines(Console(file=out, width=200), clock=lambda: 0.0) as lines:
        lines.add_task("reading headers")
    assert out.getvalue() == "reading headers: 0 (0:00:00)\n"


@pytest.mark.parametrize(("level", "shown"), [(None, False), ("INFO", True)])
def test_on_a_terminal_logs_are_warnings_only_unless_a_level_was_asked_for(
    level: str | None, shown: bool, dicom_dir: Path, sqlite_url: str, model_dir: Path
) -> None:
    """Log lines would break the bars; but an operator who set CXR_LOG_LEVEL=DEBUG by
    hand to troubleshoot saw nothing."""
    env = {k: v for k, v in os.environ.items() if k != "CXR_LOG_LEVEL"}
    env |= {"CXR_MODEL": str(model_dir), **({"CXR_LOG_LEVEL": level} if level else {})}
    parent, child = pty.openpty()
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "run",
            str(dicom_dir / "zoo"),
            "--database-url",
            sqlite_url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=env,
    ) as process:
        os.close(child)
        output = read_all(parent)
        assert process.wait(timeout=120) == 0, output
    assert ("INFO worker.screening: instance" in output) is shown, output


def read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")
