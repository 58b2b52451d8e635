"""Fault tests for the distributed pipeline: real worker processes, real Redis, real
PostgreSQL. Each test prints what it measured (run pytest with -s to see it).
"""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from config.settings import REPO_ROOT, Settings
from tests.dicom_factory import base_dataset, png_pixels, write
from tests.sql import rows, scalar
from tests.worker.processes import PrivatePostgres, PrivateRedis, Worker, free_port, wait_for
from tests.worker.test_imaging import EXPECTED_CODE
from worker.celery_app import QUEUE, SCREEN_TASK, make_app

pytestmark = [pytest.mark.services, pytest.mark.slow]


# --- helpers ---------------------------------------------------------------------------


def status_counts(url: str) -> dict[str, int]:
    return dict(rows(url, "SELECT status, count(*) FROM studies GROUP BY status"))


def poll_rows(url: str, query: str, enough: Callable[[list[Any]], bool], what: str) -> list[Any]:
    """The rows of the first poll that has enough of them, not of a second query that
    may come after the study or batch has moved on."""
    seen: list[list[Any]] = [[]]

    def check() -> bool:
        seen.append(rows(url, query))
        return enough(seen[-1])

    wait_for(check, 120, what, 0.05)
    return seen[-1]


def all_final(url: str, n: int) -> bool:
    counts = status_counts(url)
    return sum(counts.get(s, 0) for s in ("screened", "rejected", "failed")) == n and (
        sum(counts.values()) == n
    )


def counts_once_one_is_screened(url: str) -> dict[str, int]:
    """Wait until a first study is screened (the work is under way), then the counts."""
    wait_for(lambda: status_counts(url).get("screened", 0) >= 1, 120, "a first screened study", 0.1)
    return status_counts(url)


def make_studies(
    folder: Path, cxr_dir: Path, n_studies: int, per_study: int, *, large: bool = False
) -> list[str]:
    """``n_studies`` chest studies of ``per_study`` frontal CR images (shared PNGs).

    ``large``: 2500 x 2500 12-bit JPEG 2000 images (about 0.3 s each to decode), so a
    study takes long enough to be interrupted while it is being screened.
    """
    pngs = sorted((cxr_dir / "test" / "normal").glob("*.png"))
    templates = []
    for png in pngs[:3]:
        pixels = png_pixels(png)
        if large:
            big = Image.fromarray(pixels).resize((2500, 2500))
            ds = base_dataset(np.asarray(big, dtype=np.uint16) * 16, bits=12)
            ds.WindowCenter, ds.WindowWidth = 2040.5, 4081
            ds.compress(JPEG2000Lossless)
        else:
            ds = base_dataset(pixels)
        templates.append(ds)
    uids = []
    for s in range(n_studies):
        uid = f"1.2.826.0.1.3680043.10.77.{os.getpid()}.{time.time_ns() % 10**9}.{s + 1}"
        uids.append(uid)
        for i in range(per_study):
            ds = copy.deepcopy(templates[(s + i) % len(templates)])
            ds.StudyInstanceUID = uid
            ds.SeriesInstanceUID = f"{uid}.1"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{uid}.1.{i + 1}"
            write(ds, folder / uid / f"{i}.dcm")
    return uids


def python_module(
    module: str, *args: str, env: dict[str, str], cwd: Path = REPO_ROOT
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` as an operator runs it: its own environment, no stdin."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=cwd,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = python_module("worker", *args, env=env)
    assert done.returncode == 0, done.stderr
    return done


def ingest(folder: Path, env: dict[str, str], *extra: str) -> str:
    return cli("ingest", str(folder), *extra, env=env).stdout


def send_raw(
    broker_url: str, kwargs: Any = None, args: Any = None, task: str = SCREEN_TASK, **options: Any
) -> None:
    """Publish a task message the way any Celery client would."""
    app = make_app(Settings(broker_url=broker_url))
    try:
        app.send_task(task, args=args, kwargs=kwargs, queue=QUEUE, **options)
    finally:
        app.close()


def assert_exactly_once(url: str, n_studies: int, n_files: int) -> None:
    assert scalar(url, "SELECT count(*) FROM studies") == n_studies
    assert scalar(url, "SELECT count(DISTINCT study_instance_uid) FROM studies") == n_studies
    assert scalar(url, "SELECT count(*) FROM predictions") == n_files
    assert scalar(url, "SELECT count(DISTINCT source) FROM predictions") == n_files
    assert scalar(url, "SELECT count(DISTINCT sop_instance_uid) FROM predictions") == n_files


def worker_env(broker_url: str, database_url: str, model_dir: Path, **extra: Any) -> dict[str, str]:
    env = {
        "CXR_BROKER_URL": broker_url,
        "CXR_DATABASE_URL": database_url,
        "CXR_MODEL": str(model_dir),
        "CXR_LOG_JSON": "false",
    }
    env.update({f"CXR_{k.upper()}": str(v) for k, v in extra.items()})
    return env


# --- 1. a worker killed mid-study ------------------------------------------------------


def test_fault1_sigkill_worker_while_screening(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    n, per = 6, 4
    make_studies(tmp_path / "export", cxr_dir, n, per, large=True)
    env = worker_env(broker, postgres_url, model_dir, visibility_timeout=10)
    print(f"\nfault 1: {ingest(tmp_path / 'export', env).strip()}")
    first = Worker(env, tmp_path / "worker1.log")
    second: Worker | None = None
    processing = "SELECT study_instance_uid FROM studies WHERE status = 'processing'"
    try:
        ((victim,), *_) = poll_rows(postgres_url, processing, bool, "a study in progress")
        children = first.children()
        assert children, "no pool process found"
        os.kill(children[0], signal.SIGKILL)
        killed_at = time.monotonic()
        # task_reject_on_worker_lost: the message goes straight back to the queue.
        attempts_of = f"SELECT attempts FROM studies WHERE study_instance_uid = '{victim}'"
        again = wait_for(lambda: scalar(postgres_url, attempts_of) >= 2, 120, "redelivery", 0.05)
        print(
            f"fault 1: SIGKILLed pool process {children[0]} while it screened {victim}; "
            f"the worker replaced it and the study was delivered again after {again:.1f} s"
        )
        # Killed at once: the redelivered study is in progress now, and often the last one
        # (it went back to the end of the queue). Waiting for a study in progress after it
        # failed on a fast machine, where that study had finished by the next poll.
        first.kill()
        # read after the kill: what the dead worker left in progress, and its attempts
        in_flight = dict(
            rows(
                postgres_url,
                "SELECT study_instance_uid, attempts FROM studies WHERE status = 'processing'",
            )
        )
        assert in_flight, "the study in progress finished before the kill"
        screened_before = status_counts(postgres_url).get("screened", 0)
        print(
            f"fault 1: then SIGKILLed the whole worker (pid {first.pid} and its pool) while "
            f"it screened {sorted(in_flight)}, with {screened_before}/{n} screened"
        )
        second = Worker(env, tmp_path / "worker2.log")
        waited = wait_for(lambda: all_final(postgres_url, n), 180, "every study to finish")
        attempts = dict(rows(postgres_url, "SELECT study_instance_uid, attempts FROM studies"))
        print(
            f"fault 1: a new worker finished all {n} studies {waited:.1f} s after it started "
            f"(visibility timeout 10 s); attempts per study {sorted(attempts.values())}; "
            f"{time.monotonic() - killed_at:.1f} s since the first kill"
        )
        assert status_counts(postgres_url) == {"screened": n}
        assert_exactly_once(postgres_url, n, n * per)
        assert attempts[victim] >= 2, attempts
        # each study the dead worker held was delivered again, not left or lost
        assert all(attempts[uid] > before for uid, before in in_flight.items()), (
            in_flight,
            attempts,
        )
        assert second.alive()
        print(f"fault 1: rows: studies={n}, predictions={n * per}, no duplicates")
    finally:
        first.kill()
        if second is not None:
            second.stop()


# --- 2. Redis restarted under load -----------------------------------------------------


def test_fault2_redis_restart_loses_nothing(
    postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    n, per = 6, 3
    make_studies(tmp_path / "export", cxr_dir, n, per, large=True)
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis", free_port())
    server.start()
    env = worker_env(server.url, postgres_url, model_dir, visibility_timeout=10)
    try:
        print(f"\nfault 2: {ingest(tmp_path / 'export', env).strip()}")
        with Worker(env, tmp_path / "worker.log") as worker:
            before = counts_once_one_is_screened(postgres_url)
            server.kill()
            print(f"fault 2: SIGKILLed redis (appendonly, fsync always) with studies {before}")
            time.sleep(3)
            server.start()
            waited = wait_for(lambda: all_final(postgres_url, n), 180, "every study to finish")
            print(
                f"fault 2: redis back after 3 s down; all {n} studies screened {waited:.1f} s "
                f"later; worker alive={worker.alive()}"
            )
            assert status_counts(postgres_url) == {"screened": n}
            assert_exactly_once(postgres_url, n, n * per)
            assert worker.alive()
    finally:
        server.kill()


# --- 3. PostgreSQL stopped for 20 s ----------------------------------------------------


def test_fault3_postgres_down_for_20s(
    model_dir: Path, cxr_dir: Path, tmp_path: Path, broker: str
) -> None:
    n, per = 6, 3
    make_studies(tmp_path / "export", cxr_dir, n, per, large=True)
    with PrivatePostgres(free_port()) as database:
        url = database.url
        env = worker_env(broker, url, model_dir)
        print(f"\nfault 3: {ingest(tmp_path / 'export', env).strip()}")
        with Worker(env, tmp_path / "worker.log") as worker:
            before = counts_once_one_is_screened(url)
            database.stop()
            stopped = time.monotonic()
            time.sleep(20)
            database.start()
            print(
                f"fault 3: PostgreSQL stopped for {time.monotonic() - stopped:.1f} s "
                f"with studies {before}"
            )
            waited = wait_for(lambda: all_final(url, n), 180, "every study to finish")
            retries = worker.log().count("transient failure")
            print(
                f"fault 3: all {n} studies screened {waited:.1f} s after PostgreSQL returned; "
                f"{retries} retries logged; worker alive={worker.alive()}"
            )
            assert status_counts(url) == {"screened": n}
            assert_exactly_once(url, n, n * per)
            assert retries >= 1, "the outage was not noticed (no retry logged)"
            assert worker.alive()


# --- 4. the same work twice ------------------------------------------------------------


def test_fault4_ingest_twice_and_duplicate_delivery(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    n, per = 4, 2
    make_studies(tmp_path / "export", cxr_dir, n, per)
    env = worker_env(broker, postgres_url, model_dir)
    queue = redis.Redis.from_url(broker)
    ingest(tmp_path / "export", env)
    per_ingest = queue.llen(QUEUE)
    second = ingest(tmp_path / "export", env)  # still queued: sent again, harmless
    uid, files = rows(postgres_url, "SELECT study_instance_uid, files FROM studies LIMIT 1")[0]
    message = {"study_instance_uid": uid, "files": files, "model_version": "dev-0.0.1"}
    message["model_version"] = scalar(postgres_url, "SELECT model_version FROM studies LIMIT 1")
    forced = {**message, "force": True}
    for body in (message, message, forced, forced):
        send_raw(broker, kwargs=body)
    sent = queue.llen(QUEUE)
    worker = Worker(env, tmp_path / "worker.log")

    def every_task_done(tasks: int) -> bool:
        # an empty queue is not enough: prefetched duplicates are still to run
        return worker.log().count(" succeeded in ") >= tasks and all_final(postgres_url, n)

    try:
        wait_for(lambda: every_task_done(sent), 120, f"{sent} tasks")
        ids = rows(postgres_url, "SELECT id, source FROM predictions ORDER BY id")
        third = ingest(tmp_path / "export", env)  # all final now: nothing sent
        assert "queued 0 studies" in third, third
        ingest(tmp_path / "export", env, "--force")  # re-screens into the same rows
        wait_for(lambda: every_task_done(sent + per_ingest), 120, "the forced tasks")
        log = worker.log()
        skipped = log.count(": 'skipped'")
        print(
            f"\nfault 4: {n} studies ingested twice ({second.strip()}), one study sent 4 more "
            f"times (2 plain, 2 forced), then ingest again ({third.strip()}) and --force: "
            f"{log.count('succeeded')} tasks ran, {skipped} skipped as already final; rows: "
            f"studies={scalar(postgres_url, 'SELECT count(*) FROM studies')}, "
            f"predictions={scalar(postgres_url, 'SELECT count(*) FROM predictions')}"
        )
        assert status_counts(postgres_url) == {"screened": n}
        assert_exactly_once(postgres_url, n, n * per)
        assert rows(postgres_url, "SELECT id, source FROM predictions ORDER BY id") == ids
        assert skipped >= 1
    finally:
        worker.stop()


# --- 5. bad messages -------------------------------------------------------------------


def test_fault5_malformed_messages_and_missing_files(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    env = worker_env(broker, postgres_url, model_dir)
    worker = Worker(env, tmp_path / "worker.log")
    client = redis.Redis.from_url(broker)
    missing_uid = "1.2.826.0.1.3680043.10.77.555"
    try:
        send_raw(
            broker, kwargs={"study_instance_uid": "not a uid", "files": [], "model_version": "x"}
        )
        send_raw(broker, kwargs={"unexpected": 1})
        send_raw(broker, args=[1, 2, 3])
        send_raw(
            broker,
            kwargs={
                "study_instance_uid": "1.2.3",
                "files": ["../../etc/passwd"],
                "model_version": "x",
            },
        )
        # Celery logs the whole body of a message it cannot take: not the paths.
        patient = "/exports/DOE^JOHN_MRN1234567/1.dcm"
        send_raw(
            broker, kwargs={"study_instance_uid": "1.2.3", "files": [patient]}, serializer="pickle"
        )
        send_raw(broker, kwargs={"files": [patient]}, task="cxr_screen.renamed_task")
        # Not sent: raw non-JSON bytes pushed onto the Redis list by a foreign client.
        # Kombu cannot decode the envelope and the worker exits (a supervisor restarts
        # it; the item is already consumed). See the README, Limitations.
        version = scalar_model_version(model_dir)
        send_raw(
            broker,
            kwargs={
                "study_instance_uid": missing_uid,
                "files": [str(tmp_path / "gone" / "1.dcm")],
                "model_version": version,
            },
        )
        uids = make_studies(tmp_path / "export", cxr_dir, 1, 1)
        ingest(tmp_path / "export", env)
        wait_for(
            lambda: (
                scalar(
                    postgres_url,
                    f"SELECT status FROM studies WHERE study_instance_uid = '{uids[0]}'",
                )
                == "screened"
            ),
            120,
            "the good study after the bad messages",
        )
        log = worker.log()
        missing = rows(
            postgres_url,
            "SELECT s.status, p.reason_code, p.reason FROM studies s JOIN predictions p "
            f"ON p.source LIKE '%gone%' WHERE s.study_instance_uid = '{missing_uid}'",
        )
        malformed = log.count("malformed task")
        print(
            f"\nfault 5: {malformed} malformed task messages logged and acknowledged; "
            f"pickle refused={'untrusted content of type pickle' in log}; "
            f"missing file -> {missing}; worker alive={worker.alive()}"
        )
        assert malformed == 4, log
        assert "path escapes the ingest root" in log and "not a DICOM UID" in log
        assert "untrusted content of type pickle" in log
        assert "unregistered task of type 'cxr_screen.renamed_task'" in log
        assert "MRN1234567" not in log
        assert missing and missing[0][0] == "rejected" and missing[0][1] == "unreadable"
        assert "No such file" in missing[0][2]
        assert worker.alive()
    finally:
        worker.stop()
        client.close()


def scalar_model_version(model_dir: Path) -> str:
    from worker.model import read_card

    return read_card(model_dir).model_version


# --- 6. the zoo through the queue ------------------------------------------------------


def test_fault6_zoo_through_the_queue(
    broker: str, postgres_url: str, model_dir: Path, zoo_dir: Path, tmp_path: Path
) -> None:
    env = worker_env(broker, postgres_url, model_dir)
    out = ingest(zoo_dir, env)
    n_studies = int(out.split("queued ")[1].split()[0])
    worker = Worker(env, tmp_path / "worker.log", concurrency=2)
    try:
        waited = wait_for(lambda: all_final(postgres_url, n_studies), 180, "the zoo")
        by_source = {
            r[0]: r
            for r in rows(postgres_url, "SELECT source, status, reason_code FROM predictions")
        }
        with (zoo_dir / "manifest.csv").open() as handle:
            manifest = list(csv.DictReader(handle))
        for entry in manifest:
            row = by_source[str((zoo_dir / entry["file"]).absolute())]
            expected = EXPECTED_CODE[entry["expected_behaviour"]]
            if expected is None:
                assert row[1] == "screened", (entry["file"], row)
            else:
                assert (row[1], row[2]) == ("rejected", expected.value), (entry["file"], row)
        counts = status_counts(postgres_url)
        print(
            f"\nfault 6: zoo: {out.strip()}; finished in {waited:.1f} s; studies {counts}; "
            f"{len(by_source)} file rows; all {len(manifest)} manifest outcomes match; "
            f"worker alive={worker.alive()}"
        )
        assert "failed" not in counts
        assert worker.alive()
    finally:
        worker.stop()


# --- 7. a pool process killed in the middle of a batch ---------------------------------


def test_fault7_batch_killed_midway_is_split_and_finished(
    broker: str, postgres_url: str, model_dir: Path, cxr_dir: Path, tmp_path: Path
) -> None:
    n, per = 2 * 9, 2  # ingest puts 2 studies in each of 9 messages
    make_studies(tmp_path / "export", cxr_dir, n, per, large=True)
    env = worker_env(broker, postgres_url, model_dir)
    out = ingest(tmp_path / "export", env)
    assert redis.Redis.from_url(broker).llen(QUEUE) == 9, out
    worker = Worker(env, tmp_path / "worker.log")
    processing = "SELECT study_instance_uid FROM studies WHERE status = 'processing'"
    try:
        two = poll_rows(postgres_url, processing, lambda r: len(r) == 2, "a batch in progress")
        batch = {uid for (uid,) in two}
        os.kill(worker.children()[0], signal.SIGKILL)
        waited = wait_for(lambda: all_final(postgres_url, n), 180, "every study to finish")
        attempts = dict(rows(postgres_url, "SELECT study_instance_uid, attempts FROM studies"))
        print(
            f"\nfault 7: {out.strip()}; SIGKILLed the pool process screening a batch of 2; "
            f"all {n} studies final {waited:.1f} s later; attempts {sorted(attempts.values())}"
        )
        assert status_counts(postgres_url) == {"screened": n}
        assert_exactly_once(postgres_url, n, n * per)
        assert all(attempts[uid] == 3 for uid in batch), attempts  # batch, again, alone
        assert "sending them one per message" in worker.log()
        assert worker.alive()
    finally:
        worker.stop()


# --- 8. PostgreSQL down for longer than the retries ------------------------------------


def test_fault8_postgres_down_longer_than_the_retries_loses_no_study(
    model_dir: Path, cxr_dir: Path, tmp_path: Path, broker: str
) -> None:
    n = 4
    make_studies(tmp_path / "export", cxr_dir, n, 1)
    with PrivatePostgres(free_port()) as database:
        url = database.url
        env = worker_env(broker, url, model_dir, task_max_retries=1)  # about 2 s of retries
        print(f"\nfault 8: {ingest(tmp_path / 'export', env).strip()}")
        database.stop()
        with Worker(env, tmp_path / "worker.log") as worker:
            started = time.monotonic()

            def given_up() -> int:
                return worker.log().count("database still unavailable")

            # every message past its one retry (1-2 s) at least once, however slow the
            # worker's start, then the rest of 20 s for the backoff to show
            wait_for(lambda: given_up() >= n, 120, "each study's retries used up")
            time.sleep(max(0.0, 20 - (time.monotonic() - started)))
            kept = given_up()
            database.start()
            waited = wait_for(lambda: all_final(url, n), 120, "every study to finish")
            print(
                f"fault 8: PostgreSQL down 20 s; every study used up its retries, and its message "
                f"came back {kept} times in all; all {n} studies final {waited:.1f} s after "
                "PostgreSQL returned, with no requeue"
            )
            # Each delivery past the retries waits out the backoff (2-4 s, 4-8 s, ...): a
            # message handed straight back would come back hundreds of times.
            assert n <= kept <= 4 * n
            reasons = rows(url, "SELECT status, reason FROM studies WHERE status <> 'screened'")
            assert status_counts(url) == {"screened": n}, reasons
            assert_exactly_once(url, n, n)
            assert worker.alive()
