"""``python -m training.benchmark``: the configured model by default, one-line errors.

Run as a child process: the benchmark pins its process to one core.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from config.settings import REPO_ROOT


def benchmark(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    return subprocess.run(
        [sys.executable, "-m", "training.benchmark", *args],
        capture_output=True,
        text=True,
        env={**environ, "PYTHONPATH": str(REPO_ROOT), **env},
        cwd=cwd,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_the_default_model_is_the_configured_one(shipped_model: Path, tmp_path: Path) -> None:
    done = benchmark("--batch", "2", "--repeats", "1", cwd=tmp_path, CXR_MODEL=str(shipped_model))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{shipped_model}: "), done.stdout


def test_a_missing_model_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"
    done = benchmark(cwd=tmp_path, CXR_MODEL=str(missing))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: no model card at {missing / 'model_card.json'} "
        "(is --model / CXR_MODEL a model folder?)"
    ]
    assert "Traceback" not in done.stderr
