"""Throughput benchmark: how close does cxr-screen get to the machine's limit?

One run, one machine, the same files for every path:

1. a synthetic PACS export built from the shared 224-256 px PNGs: N single-instance
   studies of 2,048 x 2,500 (Columns x Rows), 12-bit, half MONOCHROME1, with a window,
   in four encodings (uncompressed, RLE, JPEG-LS, JPEG 2000 lossless), cached under
   ``--workdir`` (default ``bench/out``);
2. **limit**: ``screen_study`` (decode + normalise + batched inference) in a tight
   in-process loop on a fork pool of ``--workers`` processes, no database, no broker;
3. **run**: ``cxr-screen run`` into SQLite, and **distributed**: ``cxr-screen ingest``
   then ``cxr-screen worker`` through Redis into PostgreSQL;
4. **baseline**: the seed's way, on a subset of the same files: full-resolution
   modality LUT + window, full-resolution scikit-image anti-aliased resize, one Keras
   ``model.predict`` per image;
5. a table per encoding, then 1 vs 2 processes and 1,024^2 / 2,048^2 / 3,000^2 images,
   and the model runtimes (Keras, tf.function, LiteRT, and ONNX Runtime when installed)
   measured side by side.

Throughput ("img/s") is measured the same way for every path: images divided by the
span from the first study's start to the last study's finish, taken from the study
timestamps (``started_at``/``finished_at``, in the results table for run and
distributed). Start-up is reported on its own ("first result": process start to the
first finished study) and in "wall img/s" (images / whole command time).

    python -m bench.throughput                       # default run (~4 min on 2 cores)
    python -m bench.throughput --quick               # smoke test (~1 min)
    python -m bench.throughput --studies 200 --encodings raw j2k --skip-distributed
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import multiprocessing
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_WORKDIR = REPO / "bench" / "out"
ENCODINGS = ("raw", "rle", "jpegls", "j2k")
SHAPE = (2500, 2048)  # Rows x Columns
SCALING_SIDES = (1024, 2048, 3000)
WINDOW_CENTER, WINDOW_WIDTH, OFFSET = 2000.0, 3600.0, 200.0
PG_ADMIN_URL = os.environ.get(
    "CXR_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CXR_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
MAX_PIXELS = 50_000_000
BUSY_LOAD_PER_CPU = 0.5  # 1-minute load average per usable CPU above which figures are suspect


# --------------------------------------------------------------------------- export


def _pngs() -> list[Path]:
    found = sorted((SHARED_DATA / "cxr" / "test").glob("*/*.png"))
    if not found:
        sys.exit(f"no PNGs under {SHARED_DATA / 'cxr' / 'test'} (set CXR_SHARED_DATA)")
    return found


def synthetic_pixels(png: Path, shape: tuple[int, int], seed: int) -> np.ndarray:
    """A shared PNG upsampled to ``shape``, 12-bit (200..3800 + noise), MONOCHROME2 sense."""
    from PIL import Image
    from skimage.transform import resize

    with Image.open(png) as img:
        p8 = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    big = resize(p8, shape, order=1, anti_aliasing=False, preserve_range=True)
    noise = np.random.default_rng(seed).normal(0.0, 6.0, shape)
    values = OFFSET + big * (WINDOW_WIDTH) + noise
    return np.clip(np.rint(values), 0, 4095).astype(np.uint16)


def synthetic_dataset(values: np.ndarray, *, monochrome1: bool, key: str) -> Any:
    """A DX chest PA instance of the 12-bit ``values`` (stored inverted for MONOCHROME1)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dx_storage = "1.2.840.10008.5.1.4.1.1.1.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = dx_storage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = dx_storage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[key, "sop"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[key, "series"])
    ds.PatientID = f"BENCH-{key}"
    ds.AccessionNumber = key[-16:]
    ds.StudyDate = "20261126"
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
        stored = 4095 - values
        ds.WindowCenter, ds.WindowWidth = 4095.0 - WINDOW_CENTER, WINDOW_WIDTH
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
        stored = values
        ds.WindowCenter, ds.WindowWidth = WINDOW_CENTER, WINDOW_WIDTH
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def _syntax(encoding: str) -> Any:
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    return {"raw": None, "rle": RLELossless, "jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}[
        encoding
    ]


def _make_study(job: tuple[Path, int, tuple[int, int], tuple[str, ...], str]) -> None:
    workdir, index, shape, encodings, png = job
    values = synthetic_pixels(Path(png), shape, seed=index)
    for encoding in encodings:
        path = export_dir(workdir, shape, encoding) / f"study{index:05d}.dcm"
        if path.exists():
            continue
        key = f"{shape[0]}x{shape[1]}-{encoding}-{index}"
        ds = synthetic_dataset(values, monochrome1=index % 2 == 1, key=key)
        syntax = _syntax(encoding)
        if syntax is not None:
            ds.compress(syntax)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        ds.save_as(tmp, enforce_file_format=True)
        tmp.rename(path)


def export_dir(workdir: Path, shape: tuple[int, int], encoding: str) -> Path:
    return workdir / f"{shape[0]}x{shape[1]}" / encoding


def generate(
    workdir: Path, n: int, shape: tuple[int, int], encodings: Sequence[str], workers: int
) -> dict[str, list[Path]]:
    """N studies per encoding under ``workdir``; files already there are kept."""
    pngs = _pngs()
    jobs = []
    for index in range(n):
        missing = tuple(
            e
            for e in encodings
            if not (export_dir(workdir, shape, e) / f"study{index:05d}.dcm").exists()
        )
        if missing:
            # A stride through the sorted (covid, normal, pneumonia) list mixes classes.
            png = str(pngs[(index * 37) % len(pngs)])
            jobs.append((workdir, index, shape, missing, png))
    if jobs:
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_make_study, jobs))
        _say(f"generated {len(jobs)} studies of {shape} in {time.perf_counter() - start:.0f} s")
    return {
        e: [export_dir(workdir, shape, e) / f"study{i:05d}.dcm" for i in range(n)]
        for e in encodings
    }


# --------------------------------------------------------------------------- results


@dataclass
class PathResult:
    path: str
    images: int = 0
    seconds: float = 0.0  # first study start -> last study finish
    wall_seconds: float = 0.0  # command / pool start -> end
    first_result_s: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: dict[str, float] = field(default_factory=dict)  # per worker process
    probabilities: dict[str, float] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)  # CPU per study, by process role
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def wall_rate(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    @property
    def peak_rss_mb(self) -> float | None:
        return max(self.rss_mb.values()) if self.rss_mb else None


def _from_rows(result: PathResult, rows: Sequence[tuple[Any, ...]]) -> PathResult:
    """Fill a result from (uid, started_at, finished_at, probability, n_screened) rows."""

    def utc(value: Any) -> float:
        if isinstance(value, str):
            value = dt.datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return float(value.timestamp())

    done = [r for r in rows if r[1] is not None and r[2] is not None]
    if not done:
        return result
    starts, ends = [utc(r[1]) for r in done], [utc(r[2]) for r in done]
    result.images = sum(int(r[4] or 0) for r in done)
    result.seconds = max(ends) - min(starts)
    result.latencies_ms = [(e - s) * 1000 for s, e in zip(starts, ends, strict=True)]
    result.probabilities = {str(r[0]): float(r[3]) for r in done if r[3] is not None}
    return result


# --------------------------------------------------------------------------- limit

_classifier: Any = None


def _init_limit(model: str) -> None:
    global _classifier
    from worker.model import Classifier

    _classifier = Classifier(Path(model), threads=1)


def limit_pool(model: Path, workers: int) -> ProcessPoolExecutor:
    """Fork processes that each load the model once: the pool of the limit and the soak."""
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_init_limit,
        initargs=(str(model),),
    )


def _limit_task(uid: str, files: list[str]) -> tuple[Any, ...]:
    from worker.screening import screen_study

    cpu = time.process_time()
    outcome = screen_study(uid, files, _classifier, max_pixels=MAX_PIXELS)
    cpu = time.process_time() - cpu
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (
        uid,
        outcome.started_at,
        outcome.finished_at,
        outcome.covid_probability,
        outcome.n_screened,
        os.getpid(),
        rss_mb,
        cpu,
    )


def _vm_rss_mb(pid: int | str = "self") -> float:
    with contextlib.suppress(OSError):  # a process that has just exited
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _soak_task(uid: str, files: list[str]) -> tuple[int, float]:
    from worker.screening import screen_study

    screen_study(uid, files, _classifier, max_pixels=MAX_PIXELS)
    return os.getpid(), _vm_rss_mb()


def soak(files: Sequence[Path], model: Path, workers: int, studies: int) -> dict[str, Any]:
    """Memory over a long run: ``studies`` studies cycling over ``files``, RSS sampled."""
    samples: dict[int, list[tuple[int, float]]] = {}
    start = time.perf_counter()
    with limit_pool(model, workers) as pool:
        uids = [f"soak-{i}" for i in range(studies)]
        paths = [[str(files[i % len(files)])] for i in range(studies)]
        for done, (pid, rss) in enumerate(pool.map(_soak_task, uids, paths, chunksize=8), 1):
            samples.setdefault(pid, []).append((done, rss))
    seconds = time.perf_counter() - start
    print(f"\n## memory over {studies} studies ({workers} processes, {seconds:.0f} s)")
    print("| process | RSS after 1% MB | after 10% MB | after 50% MB | at the end MB |")
    print("|---|---:|---:|---:|---:|")
    out: dict[str, Any] = {"studies": studies, "seconds": seconds, "processes": {}}
    for pid, series in samples.items():

        def at(fraction: float, series: list[tuple[int, float]] = series) -> float:
            return series[min(len(series) - 1, int(len(series) * fraction))][1]

        row = [at(0.01), at(0.10), at(0.50), series[-1][1]]
        out["processes"][pid] = row
        print(f"| {pid} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
    return out


def study_uid(path: Path) -> str:
    import pydicom

    return str(
        pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
        ).StudyInstanceUID
    )


def read_through(files: Sequence[Path]) -> None:
    """Read every file once, so that each path finds them in the page cache: otherwise the
    first path measured pays the disk reads for the ones after it."""
    for f in files:
        with open(f, "rb") as handle:
            while handle.read(1 << 24):
                pass


def measure_limit(files: Sequence[Path], model: Path, workers: int) -> PathResult:
    """screen_study on a fork pool, no database and no broker: the ceiling."""
    read_through(files)
    grouped: dict[str, list[str]] = {}
    for f in files:
        with contextlib.suppress(Exception):  # not DICOM: left out of the limit
            grouped.setdefault(study_uid(f), []).append(str(f))
    studies = sorted(grouped.items())
    result = PathResult("limit")
    start = time.perf_counter()
    rows, cpu = [], 0.0
    with limit_pool(model, workers) as pool:
        futures = [pool.submit(_limit_task, uid, paths) for uid, paths in studies]
        for future in as_completed(futures):
            row = future.result()
            if result.first_result_s is None:
                result.first_result_s = time.perf_counter() - start
            rows.append(row[:5])
            pid, rss = str(row[5]), float(row[6])
            result.rss_mb[pid] = max(rss, result.rss_mb.get(pid, 0.0))
            cpu += row[7]
    result.wall_seconds = time.perf_counter() - start
    result.cpu_ms = {"pool processes": 1000 * cpu / max(1, len(rows))}
    return _from_rows(result, rows)


# --------------------------------------------------------------------------- process tree


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += _children(current)
    return out


def _vm_hwm_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0 once it has gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _pids_named(name: str) -> list[int]:
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == name:
                found.append(int(comm.parent.name))
    return found


def cpu_by_role(worker_root: int) -> dict[str, float]:
    """CPU seconds so far of the worker's main process, its pool processes, and every
    PostgreSQL and Redis server process on this machine (they share its cores)."""
    pool = [pid for pid in _tree(worker_root) if pid != worker_root]
    return {
        "worker main process": _cpu_seconds(worker_root),
        "pool processes": sum(_cpu_seconds(pid) for pid in pool),
        "PostgreSQL": sum(_cpu_seconds(pid) for pid in _pids_named("postgres")),
        "Redis": sum(_cpu_seconds(pid) for pid in _pids_named("redis-server")),
    }


class TreeWatcher:
    """Peak RSS (VmHWM) of every process in a tree, sampled while it runs."""

    def __init__(self, root: int, exclude_root: bool) -> None:
        self.root, self.exclude_root = root, exclude_root
        self.peaks: dict[str, float] = {}

    def sample(self) -> None:
        for pid in _tree(self.root):
            if self.exclude_root and pid == self.root:
                continue
            hwm = _vm_hwm_mb(pid)
            if hwm is not None:
                self.peaks[str(pid)] = max(hwm, self.peaks.get(str(pid), 0.0))


# --------------------------------------------------------------------------- run / distributed

STUDY_ROWS = (
    "SELECT study_instance_uid, started_at, finished_at, covid_probability, n_screened "
    "FROM studies WHERE finished_at IS NOT NULL"
)


def _rows(url: str, query: str) -> list[tuple[Any, ...]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query))]
    finally:
        engine.dispose()


@contextlib.contextmanager
def finished_counter(url: str) -> Iterator[Callable[[], int]]:
    """How many studies have finished, read on one engine: a new engine and connection
    every 0.1 s cost the distributed path about a tenth of a core."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)

    def finished() -> int:
        try:
            with engine.connect() as conn:
                query = "SELECT count(*) FROM studies WHERE finished_at IS NOT NULL"
                return int(conn.execute(text(query)).scalar_one())
        except Exception:  # table not created yet, database busy
            return 0

    try:
        yield finished
    finally:
        engine.dispose()


def _env(model: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CXR_MODEL=str(model),
        CXR_LOG_LEVEL="WARNING",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def _cli() -> list[str]:
    return [sys.executable, "-m", "worker"]


def folder_of(files: Sequence[Path], scratch: Path) -> Path:
    """A folder holding exactly ``files``: their own, or one of hard links to them."""
    folder = files[0].parent
    wanted = {f.resolve() for f in files}
    if (
        all(f.parent == folder for f in files)
        and {p.resolve() for p in folder.iterdir() if p.is_file()} == wanted
    ):
        return folder
    subset = scratch / "subset"
    if subset.exists():
        for old in subset.iterdir():
            old.unlink()
    subset.mkdir(parents=True, exist_ok=True)
    for index, f in enumerate(files):
        link = subset / f"{index:06d}-{f.name}"
        try:
            os.link(f, link)
        except OSError:
            link.symlink_to(f.resolve())
    return subset


def measure_run(
    files: Sequence[Path], model: Path, workers: int, scratch: Path, timeout: float = 1800
) -> PathResult:
    """``cxr-screen run`` on the folder, into a fresh SQLite file."""
    read_through(files)
    db = scratch / "run.db"
    db.unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    folder = folder_of(files, scratch)
    cmd = [*_cli(), "run", str(folder), "--database-url", url, "--workers", str(workers)]
    result = PathResult("run")
    log = (scratch / "run.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(model), stdout=log, stderr=subprocess.STDOUT, cwd=scratch)
    watcher = TreeWatcher(proc.pid, exclude_root=True)
    with finished_counter(url) as finished:
        while proc.poll() is None:
            watcher.sample()
            if result.first_result_s is None and db.exists() and finished() > 0:
                result.first_result_s = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                proc.terminate()
                result.note = "timed out"
            time.sleep(0.1)
    result.wall_seconds = time.perf_counter() - start
    log.close()
    if proc.returncode != 0:
        result.note = f"exit {proc.returncode}, see {scratch / 'run.log'}"
    result.rss_mb = watcher.peaks
    return _from_rows(result, _rows(url, STUDY_ROWS))


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"cxr_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def worker_command(template: str, workers: int) -> list[str]:
    """``--worker-cmd`` with ``{python}`` and ``{workers}`` filled in."""
    return [
        part.replace("{python}", sys.executable).replace("{workers}", str(workers))
        for part in shlex.split(template)
    ]


@contextlib.contextmanager
def running_worker(
    template: str, workers: int, env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[Any]]:
    """The ``--worker-cmd`` process, its output in ``log_path``; stopped on the way out."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            worker_command(template, workers),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
        )
        try:
            yield proc
        finally:
            _stop(proc)


def measure_distributed(
    files: Sequence[Path],
    model: Path,
    workers: int,
    scratch: Path,
    worker_cmd: str,
    timeout: float = 1800,
) -> PathResult:
    """``cxr-screen ingest`` (headers only) then workers through Redis into PostgreSQL."""
    read_through(files)
    result = PathResult("distributed")
    folder = folder_of(files, scratch)
    expected = len({study_uid(f) for f in files})
    _flush_redis(REDIS_URL)
    with throwaway_postgres() as url:
        env = _env(model, CXR_BROKER_URL=REDIS_URL, CXR_DATABASE_URL=url)
        ingest = [*_cli(), "ingest", str(folder), "--broker-url", REDIS_URL, "--database-url", url]
        start = time.perf_counter()
        done = subprocess.run(ingest, env=env, capture_output=True, text=True, cwd=scratch)
        ingest_s = time.perf_counter() - start
        if done.returncode != 0:
            result.note = f"ingest failed: {(done.stderr or done.stdout).strip()[-300:]}"
            return result
        start = time.perf_counter()
        with (
            running_worker(worker_cmd, workers, env, scratch / "worker.log") as proc,
            finished_counter(url) as count_finished,
        ):
            watcher = TreeWatcher(proc.pid, exclude_root=False)
            cpu_at_first: tuple[int, dict[str, float]] | None = None
            while True:
                watcher.sample()
                finished = count_finished()
                if finished and result.first_result_s is None:
                    result.first_result_s = time.perf_counter() - start
                    cpu_at_first = finished, cpu_by_role(proc.pid)
                if finished >= expected:
                    if cpu_at_first is not None and finished > cpu_at_first[0]:
                        result.cpu_ms = _cpu_per_study(
                            cpu_at_first[1], cpu_by_role(proc.pid), finished - cpu_at_first[0]
                        )
                    break
                if proc.poll() is not None:
                    result.note = f"worker exited {proc.returncode}, see {scratch / 'worker.log'}"
                    break
                if time.perf_counter() - start > timeout:
                    result.note = "timed out"
                    break
                time.sleep(0.1)
            result.wall_seconds = time.perf_counter() - start + ingest_s
        result.rss_mb = watcher.peaks
        result.note = (result.note + f" ingest {ingest_s:.1f} s").strip()
        return _from_rows(result, _rows(url, STUDY_ROWS))


def soak_distributed(
    files: Sequence[Path], model: Path, workers: int, scratch: Path, worker_cmd: str, studies: int
) -> dict[str, Any]:
    """The Celery worker's memory over ``studies`` studies: ``ingest --force`` of the same
    folder, round after round (each once the queue is empty), RSS of every process sampled."""
    from worker.celery_app import QUEUE
    from worker.queue.status import broker_queue_length

    folder = folder_of(files, scratch)
    rounds = max(1, math.ceil(studies / len(files)))
    _flush_redis(REDIS_URL)
    samples: list[tuple[int, dict[int, float]]] = []  # (studies sent, {pid: RSS MB})
    with throwaway_postgres() as url:
        env = _env(model, CXR_BROKER_URL=REDIS_URL, CXR_DATABASE_URL=url)
        start = time.perf_counter()
        with running_worker(worker_cmd, workers, env, scratch / "soak-worker.log") as proc:
            for done in range(rounds):
                ingest = [*_cli(), "ingest", str(folder), "--force"]
                subprocess.run(ingest, env=env, capture_output=True, check=True, cwd=scratch)
                while broker_queue_length(REDIS_URL, QUEUE) != (0, 0):
                    if proc.poll() is not None:
                        raise RuntimeError(f"worker exited, see {scratch / 'soak-worker.log'}")
                    time.sleep(0.05)
                rss = {pid: _vm_rss_mb(pid) for pid in _tree(proc.pid)}
                samples.append(((done + 1) * len(files), rss))
    seconds = time.perf_counter() - start
    sent = samples[-1][0]
    print(f"\n## worker memory over {sent} studies (ingest --force x {rounds}, {seconds:.0f} s)")
    print("| studies | main process RSS MB | pool processes RSS MB | pool process ids |")
    print("|---:|---:|---:|---|")
    marks = sorted({0, len(samples) // 10, len(samples) // 2, len(samples) - 1})
    out: dict[str, Any] = {"studies": sent, "seconds": seconds, "samples": []}
    for i in marks:
        count, rss = samples[i]
        main = rss.get(proc.pid, 0.0)
        pool = {pid: mb for pid, mb in rss.items() if pid != proc.pid}
        out["samples"].append({"studies": count, "main_mb": main, "pool_mb": pool})
        figures = ", ".join(f"{mb:.0f}" for mb in pool.values())
        print(f"| {count} | {main:.0f} | {figures} | {', '.join(map(str, pool))} |")
    return out


def _cpu_per_study(
    before: dict[str, float], after: dict[str, float], studies: int
) -> dict[str, float]:
    """ms of CPU per study by role, from the first result to the last (start-up left out)."""
    return {role: 1000 * (after[role] - before[role]) / studies for role in after}


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- baseline


def straightforward_input(path: str | Path, size: int) -> np.ndarray:
    """The seed's order of operations, at full resolution, as the reference.

    Full-resolution modality LUT and window (pydicom), MONOCHROME1 inversion, the same
    10 % border crop, a scikit-image anti-aliased resize of the full image to the model
    size, then the same histogram equalisation.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from skimage.exposure import equalize_hist
    from skimage.transform import resize

    from worker.imaging.pipeline import BORDER_FRACTION, crop_border

    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    # PS3.3 C.11.2.1.2.1 linear window to [0, 1], as apply_voi_lut does to the output range.
    gray = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gray = 1.0 - gray
    core = crop_border(gray, BORDER_FRACTION)
    resized = resize(core, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    _ = apply_voi_lut  # the pydicom function that the seed called; same formula as above
    return equalize_hist(resized, nbins=256).astype(np.float32)[..., np.newaxis]


def _keras_model(model: Path, size: int) -> tuple[Any, str]:
    import keras

    if (model / "model.keras").is_file():
        return keras.models.load_model(model / "model.keras", compile=False), "model.keras"
    try:
        from training.models import build_model
    except ImportError as exc:
        raise SystemExit(f"no model.keras in {model} and no training package: {exc}") from exc
    built = build_model("compact", size)
    return built, "compact built on the fly (random weights: no model.keras yet)"


def baseline_main(args: argparse.Namespace) -> None:
    """Subprocess entry: seed-style predictions, then the runtime comparison; JSON out."""
    import tensorflow as tf

    from worker.model import read_card

    model = Path(args.model)
    size = read_card(model).input_size
    keras_model, source = _keras_model(model, size)
    out: dict[str, Any] = {"keras_source": source, "images": []}
    # warm-up, untimed: Keras, and the decoders and scikit-image the first file imports
    keras_model.predict(straightforward_input(args.files[0], size)[np.newaxis], verbose=0)
    for path in args.files:
        start = time.perf_counter()
        x = straightforward_input(path, size)
        p = float(np.asarray(keras_model.predict(x[np.newaxis], verbose=0)).reshape(-1)[0])
        out["images"].append({"path": path, "ms": (time.perf_counter() - start) * 1000, "p": p})
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.runtimes:
        out["runtimes"] = _runtimes(keras_model, model, size, tf, source)
    print(json.dumps(out))


def _timeit(fn: Callable[[], Any], images: int, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) * 1000 / (repeat * images)


def _runtimes(keras_model: Any, model: Path, size: int, tf: Any, source: str) -> dict[str, Any]:
    """ms per image for the same network under each runtime, batch 16 unless noted."""
    from ai_edge_litert.interpreter import Interpreter

    batch = np.random.default_rng(0).random((16, size, size, 1), dtype=np.float32)
    tflite = model / "model.tflite"
    if source != "model.keras":  # random Keras weights: convert this very network
        converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
        tflite = Path(tempfile.mkdtemp()) / "model.tflite"
        tflite.write_bytes(converter.convert())
    figures: dict[str, Any] = {}
    figures["keras predict, 1 image per call"] = _timeit(
        lambda: keras_model.predict(batch[:1], verbose=0), 1, 10
    )
    figures["keras predict, batch 16"] = _timeit(lambda: keras_model.predict(batch, verbose=0), 16)
    figures["keras __call__, batch 16"] = _timeit(lambda: keras_model(batch, training=False), 16)
    compiled = tf.function(lambda x: keras_model(x, training=False), reduce_retracing=True)
    figures["tf.function, batch 16"] = _timeit(lambda: compiled(tf.constant(batch)), 16)
    for threads in (1, 2):
        interp = Interpreter(model_path=str(tflite), num_threads=threads)
        index = interp.get_input_details()[0]["index"]
        interp.resize_tensor_input(index, list(batch.shape))
        interp.allocate_tensors()

        def invoke(interp: Any = interp, index: int = index) -> None:
            interp.set_tensor(index, batch)
            interp.invoke()

        figures[f"LiteRT {threads} thread(s), batch 16"] = _timeit(invoke, 16)
    reference = np.asarray(keras_model(batch, training=False)).reshape(-1)
    interp = Interpreter(model_path=str(tflite), num_threads=1)
    interp.resize_tensor_input(interp.get_input_details()[0]["index"], list(batch.shape))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], batch)
    interp.invoke()
    lite = interp.get_tensor(interp.get_output_details()[0]["index"]).reshape(-1)
    figures["max |p keras - p litert|"] = float(np.abs(reference - lite).max())
    figures.update(_onnxruntime(compiled, batch, reference, tf))
    return figures


def _onnxruntime(compiled: Any, batch: np.ndarray, reference: Any, tf: Any) -> dict[str, Any]:
    """ONNX Runtime on the same network, when tf2onnx and onnxruntime are installed (they
    are not dependencies: ``pip install tf2onnx onnxruntime`` to measure it)."""
    try:
        import onnxruntime as ort
        import tf2onnx
    except ImportError:
        return {"onnxruntime": "skipped: pip install tf2onnx onnxruntime to measure it"}
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    spec = (tf.TensorSpec((None, *batch.shape[1:]), tf.float32, name="x"),)
    tf2onnx.convert.from_function(compiled, input_signature=spec, opset=17, output_path=str(path))
    figures: dict[str, Any] = {}
    for threads in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        figures[f"ONNX Runtime {threads} thread(s), batch 16"] = _timeit(
            lambda session=session, name=name: session.run(None, {name: batch}), 16
        )
    out = np.asarray(session.run(None, {name: batch})[0]).reshape(-1)
    figures["max |p keras - p onnxruntime|"] = float(np.abs(reference - out).max())
    return figures


def measure_baseline(files: Sequence[Path], model: Path, runtimes: bool) -> tuple[PathResult, Any]:
    read_through(files)
    cmd = [sys.executable, "-m", "bench.throughput", "--_baseline", "--model", str(model)]
    cmd += ["--files", *map(str, files)]
    if runtimes:
        cmd.append("--runtimes")
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(model), cwd=REPO)
    result = PathResult("baseline", wall_seconds=time.perf_counter() - start)
    if done.returncode != 0:
        result.note = f"baseline failed: {done.stderr.strip()[-400:]}"
        return result, None
    data = json.loads(done.stdout.strip().splitlines()[-1])
    result.images = len(data["images"])
    result.latencies_ms = [i["ms"] for i in data["images"]]
    result.seconds = sum(result.latencies_ms) / 1000
    result.rss_mb = {"baseline": data["rss_mb"]}
    result.probabilities = {study_uid(Path(i["path"])): i["p"] for i in data["images"]}
    result.note = f"1 process, Keras ({data['keras_source']})"
    return result, data.get("runtimes")


def startup_costs(model: Path) -> dict[str, dict[str, float]]:
    """Import + load time and RSS of a LiteRT process against a TensorFlow one."""
    probes = {
        "LiteRT (worker)": (
            "from ai_edge_litert.interpreter import Interpreter;"
            f"i=Interpreter(model_path={str(model / 'model.tflite')!r});i.allocate_tensors()"
        ),
        "TensorFlow + Keras": "import tensorflow as tf;import keras",
    }
    if (model / "model.keras").is_file():
        probes["TensorFlow + Keras"] += (
            f";keras.models.load_model({str(model / 'model.keras')!r}, compile=False)"
        )
    out = {}
    for name, code in probes.items():
        script = (
            "import time,resource;t=time.perf_counter();"
            + code
            + ";print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        process_s = time.perf_counter() - start
        if done.returncode == 0:
            seconds, rss = done.stdout.split()[-2:]
            out[name] = {
                "seconds": float(seconds),
                "process_seconds": process_s,
                "rss_mb": int(rss) / 1024,
            }
    return out


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: PathResult | None, b: PathResult | None) -> str:
    if a is None or b is None or not a.rate or not b.rate:
        return "-"
    return f"{a.rate / b.rate:.2f}"


def print_table(encoding: str, results: dict[str, PathResult]) -> None:
    print(f"\n## {encoding}")
    header = (
        "| path | images | img/s | wall img/s | p50 ms/study | p95 ms/study "
        "| peak RSS/process MB | first result s | note |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in ("limit", "run", "distributed", "baseline"):
        r = results.get(name)
        if r is None:
            continue
        print(
            f"| {name} | {r.images} | {_fmt(r.rate)} | {_fmt(r.wall_rate)} "
            f"| {_fmt(r.percentile(50), '.0f')} | {_fmt(r.percentile(95), '.0f')} "
            f"| {_fmt(r.peak_rss_mb, '.0f')} | {_fmt(r.first_result_s, '.2f')} | {r.note} |"
        )
    limit, run = results.get("limit"), results.get("run")
    dist, base = results.get("distributed"), results.get("baseline")
    print(
        f"\nratios ({encoding}): distributed/limit {_ratio(dist, limit)}, "
        f"run/limit {_ratio(run, limit)}, distributed/baseline {_ratio(dist, base)}, "
        f"limit/baseline {_ratio(limit, base)}"
    )
    for name in ("limit", "distributed"):
        r = results.get(name)
        if r is not None and r.cpu_ms:
            parts = ", ".join(f"{role} {ms:.1f}" for role, ms in r.cpu_ms.items())
            total = sum(r.cpu_ms.values())
            print(f"CPU ms per study ({encoding}, {name}): {parts}; total {total:.1f}")
    agree = _agreement(results)
    if agree:
        print(f"agreement ({encoding}): {agree}")


def _agreement(results: dict[str, PathResult]) -> str:
    limit = results.get("limit")
    if limit is None or not limit.probabilities:
        return ""
    parts = []
    for name in ("run", "distributed", "baseline"):
        other = results.get(name)
        if other and other.probabilities:
            common = set(other.probabilities) & set(limit.probabilities)
            if common:
                delta = max(abs(other.probabilities[k] - limit.probabilities[k]) for k in common)
                parts.append(f"max |p {name} - p limit| {delta:.2g} over {len(common)} studies")
                if name != "baseline" and (delta > 0 or common != set(limit.probabilities)):
                    # run and distributed feed the model the same pixels as the limit
                    parts[-1] += " - MISMATCH"
    return "; ".join(parts)


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_load() -> dict[str, Any]:
    """The machine's load as the run starts, whatever is loading it (a training, another
    benchmark, a test suite): the 1-minute load average against the usable cores."""
    from worker.runner import usable_cores

    cpus = usable_cores()
    load = os.getloadavg()[0]
    per_cpu = load / cpus
    return {
        "cpus": cpus,
        "host_cpus": os.cpu_count(),
        "load_1min": round(load, 2),
        "load_per_cpu": round(per_cpu, 2),
        "under_load": per_cpu > BUSY_LOAD_PER_CPU,
    }


def describe_machine(machine: dict[str, Any]) -> str:
    text = (
        f"{machine['cpus']} usable CPUs ({machine['host_cpus']} on the host), "
        f"1-minute load {machine['load_1min']:.2f} at start"
    )
    if machine["under_load"]:
        text += (
            f" - WARNING: BUSY (over {BUSY_LOAD_PER_CPU} per usable CPU): "
            "figures are taken under load"
        )
    return text


def main(argv: Sequence[str] | None = None) -> None:
    from worker.runner import usable_cores

    parser = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--studies", type=int, default=160, help="studies per encoding")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--input", type=Path, help="an existing export folder instead (one row)")
    parser.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    parser.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="processes (default: the cores this process may use, taskset/cpuset)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=Path(os.environ.get("CXR_MODEL", REPO / "models" / "cxr-compact")),
    )
    parser.add_argument("--baseline-studies", type=int, default=12)
    parser.add_argument("--skip-distributed", action="store_true")
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument(
        "--worker-cmd",
        default="{python} -m worker worker --concurrency {workers}",
        help="command that starts the distributed workers ({python}, {workers} are filled in)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--generate-only", action="store_true", help="write the export (and scaling files), stop"
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        help="also screen this many studies (cycling over the "
        "uncompressed files) in the limit pool and print RSS over the run",
    )
    parser.add_argument("--json", type=Path, help="also write all figures here")
    parser.add_argument("--_baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--runtimes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._baseline:
        baseline_main(args)
        return
    if args.quick:
        args.studies, args.baseline_studies = min(args.studies, 6), min(args.baseline_studies, 2)
    model = args.model.resolve()
    if not args.generate_only and not (model / "model.tflite").is_file():
        sys.exit(f"no model.tflite in {model} (use --model or CXR_MODEL)")
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    machine = machine_load()
    if machine["under_load"]:
        _say(f"WARNING: the machine is busy: {describe_machine(machine)}")
    started = time.perf_counter()

    if args.input:
        exports = {"input": sorted(p for p in args.input.rglob("*") if p.is_file())}
    else:
        exports = generate(workdir, args.studies, SHAPE, args.encodings, args.workers)
    if args.generate_only:
        raw_n = max(4, args.studies // 2)
        for side in () if args.skip_scaling else SCALING_SIDES:
            generate(workdir, raw_n, (side, side), ["raw"], args.workers)
        return
    report: dict[str, Any] = {
        "machine": machine,
        "model": str(model),
        "workers": args.workers,
        "studies": args.studies,
        "encodings": {},
    }
    runtimes = None
    for index, (encoding, files) in enumerate(exports.items()):
        results: dict[str, PathResult] = {}
        _say(f"{encoding}: limit ({len(files)} studies, {args.workers} processes)")
        results["limit"] = measure_limit(files, model, args.workers)
        if not args.skip_run:
            _say(f"{encoding}: cxr-screen run (SQLite)")
            results["run"] = measure_run(files, model, args.workers, scratch)
        if not args.skip_distributed:
            _say(f"{encoding}: ingest + workers (Redis -> PostgreSQL)")
            results["distributed"] = measure_distributed(
                files, model, args.workers, scratch, args.worker_cmd
            )
        if not args.skip_baseline:
            _say(f"{encoding}: seed-style baseline ({args.baseline_studies} images)")
            results["baseline"], got = measure_baseline(
                files[: args.baseline_studies], model, runtimes=index == 0
            )
            runtimes = runtimes or got
        print_table(encoding, results)
        report["encodings"][encoding] = {k: _as_dict(v) for k, v in results.items()}

    if not args.skip_scaling and not args.input:
        report["scaling"] = scaling(args, workdir, model, scratch)
    if args.soak and not args.input:
        raw = generate(workdir, args.studies, SHAPE, ["raw"], args.workers)["raw"]
        report["soak"] = soak(raw, model, args.workers, args.soak)
        if not args.skip_distributed:
            report["soak_distributed"] = soak_distributed(
                raw, model, args.workers, scratch, args.worker_cmd, args.soak
            )
    if runtimes:
        print("\n## model runtimes (same network, ms per image)")
        for name, value in runtimes.items():
            print(f"- {name}: {value:.3g}" if isinstance(value, float) else f"- {name}: {value}")
        report["runtimes"] = runtimes
    costs = startup_costs(model)
    print("\n## process start-up (import + model load)")
    for name, figures in costs.items():
        print(
            f"- {name}: {figures['seconds']:.2f} s import + load "
            f"({figures['process_seconds']:.2f} s with the interpreter), "
            f"{figures['rss_mb']:.0f} MB RSS"
        )
    report["startup"] = costs
    total = time.perf_counter() - started
    print(f"\nbenchmark took {total:.0f} s; machine: {describe_machine(machine)}")
    if args.quick:
        print("--quick: a smoke test of a few studies per path, not figures to quote")
    target = args.json or workdir / "results.json"
    target.write_text(json.dumps(report, indent=2, default=str))
    print(f"figures written to {target}")


def scaling(args: argparse.Namespace, workdir: Path, model: Path, scratch: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"processes": {}, "sides": {}}
    raw = [export_dir(workdir, SHAPE, "raw") / f"study{i:05d}.dcm" for i in range(args.studies)]
    if not all(p.exists() for p in raw):
        raw = generate(workdir, args.studies, SHAPE, ["raw"], args.workers)["raw"]
    print("\n## processes (uncompressed 2,048 x 2,500)")
    print(
        "| processes | limit img/s | distributed img/s | limit p50 ms/study | peak RSS MB |\n"
        "|---:|---:|---:|---:|---:|"
    )
    # cores + 1: one process more than cores hides the database and broker waits
    for workers in sorted({1, args.workers, args.workers + 1}):
        r = measure_limit(raw, model, workers)
        d = None
        if not args.skip_distributed:
            d = measure_distributed(raw, model, workers, scratch, args.worker_cmd)
        out["processes"][workers] = {
            "limit": _as_dict(r),
            "distributed": _as_dict(d) if d else None,
        }
        print(
            f"| {workers} | {r.rate:.1f} | {_fmt(d.rate if d else None)} "
            f"| {_fmt(r.percentile(50), '.0f')} | {_fmt(r.peak_rss_mb, '.0f')} |"
        )
    n = max(4, args.studies // 2)
    print(f"\n## image size (limit path, uncompressed, {args.workers} processes, {n} studies)")
    print("| side | img/s | p50 ms/study | peak RSS MB |\n|---:|---:|---:|---:|")
    for side in SCALING_SIDES:
        files = generate(workdir, n, (side, side), ["raw"], args.workers)["raw"]
        r = measure_limit(files, model, args.workers)
        out["sides"][side] = _as_dict(r)
        print(
            f"| {side} | {r.rate:.1f} | {_fmt(r.percentile(50), '.0f')} "
            f"| {_fmt(r.peak_rss_mb, '.0f')} |"
        )
    return out


def _as_dict(result: PathResult) -> dict[str, Any]:
    data = asdict(result)
    data.pop("probabilities")
    data["latencies_ms"] = [round(v, 1) for v in data["latencies_ms"]]
    data.update(
        rate=result.rate,
        wall_rate=result.wall_rate,
        p50_ms=result.percentile(50),
        p95_ms=result.percentile(95),
        peak_rss_mb=result.peak_rss_mb,
    )
    return data


if __name__ == "__main__":
    main()
