"""What the commands share: progress for logs."""

from __future__ import annotations

import io

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
