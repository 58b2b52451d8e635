"""Real processes for the distributed tests: Celery workers, a private Redis with
persistence, a private PostgreSQL cluster. Everything started here is stopped by the
caller (in ``finally``), by process id.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text

from config.settings import REPO_ROOT


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> float:
    """Poll until ``predicate()``; returns the seconds waited, fails with ``what``."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception:  # a service that is down while we poll is not the answer
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    """A port nothing listens on now: a server of our own on a fixed one could meet
    another already there, and the test would talk to that one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid``, via /proc."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def resident_mb(pid: int, field: str = "VmRSS") -> int:
    """Resident memory of a process in MB (0 once it is gone); ``VmHWM`` for its peak
    since it was forked."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith(f"{field}:")), "x 0 kB")
    return int(line.split()[1]) // 1024


class OomKiller:
    """The kernel's OOM killer for one test: a thread that SIGKILLs any child of this
    process whose resident memory has peaked ``limit_mb`` beyond what it had when first
    seen. (Not beyond this process's own: a forked child shares the parent's file-backed
    pages without counting them, so after a long test session its resident memory stays
    far below the parent's whatever it allocates.) The peak (``VmHWM``, reset at fork)
    and not the current size: a decode's few hundred milliseconds above the limit could
    fall between two looks when the machine is busy, and no child was killed."""

    def __init__(self, limit_mb: int) -> None:
        self.limit_mb = limit_mb
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> OomKiller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        parent = os.getpid()
        baseline: dict[int, float] = {}
        while not self._stop.wait(0.002):
            for child in children_of(parent):
                first_seen = baseline.setdefault(child, resident_mb(child))
                if child in self.killed:  # dying: seen again before it is reaped
                    continue
                if resident_mb(child, "VmHWM") > first_seen + self.limit_mb:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                        self.killed.append(child)


class Worker:
    """``celery -A worker.celery_app worker`` (or ``cxr-screen worker``) as a subprocess
    with its own environment."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 1,
        command: list[str] | None = None,
    ) -> None:
        """``command``: the worker's arguments instead of plain Celery's (``cxr-screen``)."""
        self.log_path = log_path
        self._log = log_path.open("ab")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        celery = [
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            str(concurrency),
            "-Q",
            "cxr-screen",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        self.process = subprocess.Popen(
            [sys.executable, "-m", *(command or celery)],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def children(self) -> list[int]:
        """Pool processes (children of the main worker process)."""
        return children_of(self.pid)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool), as a crash would."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class PrivateRedis:
    """A redis-server of our own with append-only persistence, to restart at will."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), 20, f"redis on port {self.port}", 0.1)

    def kill(self) -> None:
        """SIGKILL: what survives is only what the append-only file had."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    assert path, f"{name} not found"
    return path


class PrivatePostgres:
    """A throwaway PostgreSQL cluster of our own (never the shared one), to stop at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="cxr-pg-"))
        self.data = self.directory / "data"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.directory, "postgres", "postgres")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self._as_postgres, *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
        )

    def __enter__(self) -> PrivatePostgres:
        """The cluster initialised and started; destroyed on exit."""
        try:
            self.init()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def init(self) -> None:
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.directory / "pg.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def ready(self) -> bool:
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        finally:
            engine.dispose()

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
