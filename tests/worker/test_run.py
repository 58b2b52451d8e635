"""`cxr-screen run` end to end: real DICOM, real model, real SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from config.settings import REPO_ROOT, Settings
from db.session import open_database
from tests.dicom_factory import base_dataset, png_pixels, write
from tests.sql import rows
from tests.worker.processes import OomKiller
from tests.worker.test_imaging import EXPECTED_CODE
from worker.cli import main
from worker.discovery import walk
from worker.privacy import PatientIdMode
from worker.queue.ingest import ingest
from worker.runner import CRASHED, run

ROW_COLUMNS = (
    "source, sop_instance_uid, study_instance_uid, status, reason_code, "
    "round(covid_probability * 10000) AS p, predicted_label, duplicate_of"
)


def settings_for(url: str, model_dir: Path) -> Settings:
    return Settings(database_url=url, model=model_dir, workers=2)


def predictions(url: str) -> dict[str, tuple]:
    found = rows(url, f"SELECT {ROW_COLUMNS} FROM predictions ORDER BY source")
    return {r[0]: r for r in found}


@pytest.mark.services
def test_run_writes_one_row_per_file_with_the_zoo_outcomes(
    database_url: str, dicom_dir: Path, model_dir: Path
) -> None:
    summary = run([dicom_dir], settings_for(database_url, model_dir))
    by_source = predictions(database_url)
    all_files = list(walk([dicom_dir]))
    assert sorted(by_source) == sorted(all_files), "every input file has exactly one row"
    assert summary.files == len(all_files)

    with (dicom_dir / "zoo" / "manifest.csv").open() as handle:
        manifest = list(csv.DictReader(handle))
    for entry in manifest:
        row = by_source[str((dicom_dir / "zoo" / entry["file"]).absolute())]
        expected = EXPECTED_CODE[entry["expected_behaviour"]]
        if expected is None:
            assert row[3] == "screened", (entry["file"], row)
            assert row[5] is not None
        else:
            assert (row[3], row[4]) == ("rejected", expected.value), (entry["file"], row)
    for real in (dicom_dir / "cxr").glob("*.dcm"):
        assert by_source[str(real.absolute())][3] == "screened"

    counted = rows(
        database_url, "SELECT sop_instance_uid FROM predictions WHERE sop_instance_uid IS NOT NULL"
    )
    assert len(counted) == len(set(counted)), "one counted row per SOP Instance UID"
    studies = rows(database_url, "SELECT study_instance_uid, status, n_screened FROM studies")
    assert len(studies) == summary.studies == len({r[0] for r in studies})
    screened = {r[0] for r in studies if r[1] == "screened"}
    assert screened == {r[2] for r in by_source.values() if r[3] == "screened" and r[7] is None}


@pytest.mark.services
def test_rerun_rewrites_the_same_rows(database_url: str, dicom_dir: Path, model_dir: Path) -> None:
    settings = settings_for(database_url, model_dir)
    run([dicom_dir / "zoo"], settings)
    first = rows(database_url, "SELECT id, source, status FROM predictions ORDER BY id")
    studies = rows(database_url, "SELECT id, study_instance_uid FROM studies ORDER BY id")
    run([dicom_dir / "zoo"], settings)
    assert rows(database_url, "SELECT id, source, status FROM predictions ORDER BY id") == first
    assert rows(database_url, "SELECT id, study_instance_uid FROM studies ORDER BY id") == studies


@pytest.mark.services
def test_sqlite_and_postgresql_get_identical_rows(
    sqlite_url: str, postgres_url: str, dicom_dir: Path, model_dir: Path
) -> None:
    for url in (sqlite_url, postgres_url):
        run([dicom_dir], settings_for(url, model_dir))
    assert predictions(sqlite_url) == predictions(postgres_url)
    study_columns = (
        "SELECT study_instance_uid, status, n_instances, n_screened, n_rejected, "
        "round(covid_probability * 10000), predicted_label FROM studies ORDER BY 1"
    )
    assert rows(sqlite_url, study_columns) == rows(postgres_url, study_columns)


def test_instances_are_grouped_by_study_not_by_folder(
    cxr_dir: Path, tmp_path: Path, sqlite_url: str, model_dir: Path
) -> None:
    pngs = sorted((cxr_dir / "test" / "normal").glob("*.png"))[:3]
    study_a, study_b = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"
    # Study A is spread over two folders; folder one also holds study B.
    write(base_dataset(png_pixels(pngs[0]), study_uid=study_a), tmp_path / "one" / "a1.dcm")
    write(base_dataset(png_pixels(pngs[1]), study_uid=study_b), tmp_path / "one" / "b1.dcm")
    write(base_dataset(png_pixels(pngs[2]), study_uid=study_a), tmp_path / "two" / "a2.dcm")
    lateral = base_dataset(png_pixels(pngs[2]), study_uid=study_b, view="LL")
    write(lateral, tmp_path / "two" / "b2_lateral.dcm")
    run([tmp_path / "one", tmp_path / "two"], settings_for(sqlite_url, model_dir))
    studies = dict(
        rows(
            sqlite_url,
            "SELECT study_instance_uid, n_instances || '/' || "
            "n_screened || '/' || n_rejected FROM studies",
        )
    )
    assert studies == {study_a: "2/2/0", study_b: "2/1/1"}
    reasons = rows(
        sqlite_url, "SELECT reason_code FROM predictions WHERE source LIKE '%b2_lateral.dcm'"
    )
    assert reasons == [("not_frontal",)]


def keyed_ref(key: str) -> str:
    return hmac.new(key.encode(), b"TEST-PATIENT-0001", hashlib.sha256).hexdigest()[:32]


@pytest.mark.parametrize(
    ("mode", "key", "stored"),
    [
        ("hash", "site-secret-one-0123", keyed_ref("site-secret-one-0123")),
        ("hash", "site-secret-two-4567", keyed_ref("site-secret-two-4567")),
        ("none", "site-secret-one-0123", None),
        ("clear", "site-secret-one-0123", "TEST-PATIENT-0001"),
    ],
)
def test_the_patient_reference_is_what_the_mode_and_key_make_it(
    cxr_dir: Path,
    tmp_path: Path,
    sqlite_url: str,
    model_dir: Path,
    mode: PatientIdMode,
    key: str,
    stored: str | None,
) -> None:
    """An unkeyed hash (recomputable by anyone with a patient list) or a reference kept
    under ``none`` would pass a check that only looks for the ID in clear."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    write(base_dataset(png_pixels(png)), tmp_path / "x.dcm")
    settings = Settings(
        database_url=sqlite_url, model=model_dir, workers=2, patient_id_mode=mode, hash_key=key
    )
    run([tmp_path], settings)
    assert rows(sqlite_url, "SELECT patient_ref FROM studies") == [(stored,)]
    tables = ("predictions",) if mode == "clear" else ("predictions", "studies")
    dump = "\n".join(str(r) for t in tables for r in rows(sqlite_url, f"SELECT * FROM {t}"))
    assert "TEST-PATIENT-0001" not in dump and "Test^Patient" not in dump


def test_a_study_takes_its_most_suspicious_film(
    cxr_dir: Path, tmp_path: Path, sqlite_url: str, model_dir: Path
) -> None:
    """One covid film among normal ones flags the study: the study's probability is the
    highest of its films', and its label is that probability's."""
    study_uid = "1.2.826.0.1.3680043.10.2.7"
    films = [
        *sorted((cxr_dir / "test" / "normal").glob("*.png"))[:2],
        *sorted((cxr_dir / "test" / "covid").glob("*.png"))[:1],
    ]
    for i, png in enumerate(films):
        write(base_dataset(png_pixels(png), study_uid=study_uid), tmp_path / f"{i}.dcm")
    summary = run([tmp_path], settings_for(sqlite_url, model_dir))
    films_p = [p for (p,) in rows(sqlite_url, "SELECT covid_probability FROM predictions")]
    threshold = json.loads((model_dir / "model_card.json").read_text())["threshold"]
    assert len(films_p) == 3 and min(films_p) < threshold <= max(films_p)
    assert rows(sqlite_url, "SELECT covid_probability, predicted_label FROM studies") == [
        (max(films_p), "covid")
    ]
    assert summary.positives == 1


def test_a_study_that_kills_its_process_is_failed_and_no_other_study_is_lost(
    cxr_dir: Path, tmp_path: Path, sqlite_url: str, model_dir: Path
) -> None:
    pngs = sorted((cxr_dir / "test" / "normal").glob("*.png"))[:5]
    for i, png in enumerate(pngs):
        write(base_dataset(png_pixels(png)), tmp_path / "export" / f"{i}.dcm")
    # Two 9,000 x 9,000 films. Decoding one takes some 330 MB more than the other studies in
    # a fresh process, but only the 160 MB pixel array (glibc maps it on its own) in a child
    # of a long test session: the rest comes from free heap the child inherited. The small
    # studies take under 20 MB, so the limit sits at 100.
    huge_uid = "1.2.826.0.1.3680043.10.2.1"
    side = np.arange(9000, dtype=np.uint16)
    for i in range(2):
        film = base_dataset(np.add.outer(side, side) % 4096, study_uid=huge_uid, bits=12)
        write(film, tmp_path / "export" / f"huge{i}.dcm")
    del film, side
    settings = Settings(database_url=sqlite_url, model=model_dir, workers=2, max_pixels=10**8)
    with OomKiller(limit_mb=100) as oom:
        summary = run([tmp_path / "export"], settings)
    assert len(oom.killed) >= 2, f"killed in the pool, then again when screened alone: {summary}"
    assert (summary.studies, summary.screened, summary.failed) == (6, 5, 1)
    studies = dict(
        rows(sqlite_url, "SELECT study_instance_uid, status || ': ' || reason FROM studies")
    )
    assert studies.pop(huge_uid) == f"failed: {CRASHED}"
    assert set(studies.values()) == {None}  # screened, no reason
    files = rows(sqlite_url, "SELECT source, status, reason FROM predictions ORDER BY source")
    export = tmp_path / "export"
    assert files == [(str(export / f"{i}.dcm"), "screened", None) for i in range(5)] + [
        (str(export / f"huge{i}.dcm"), "failed", CRASHED) for i in range(2)
    ]


def cli(
    *args: str, env_model: Path | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings}
    if env_model is not None:
        env["CXR_MODEL"] = str(env_model)
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_cli_run_prints_a_summary_and_logs_no_patient_data(
    dicom_dir: Path, sqlite_url: str, model_dir: Path
) -> None:
    done = cli("run", str(dicom_dir / "cxr"), "--database-url", sqlite_url, env_model=model_dir)
    assert done.returncode == 0, done.stderr
    assert "screened" in done.stdout and "positive" in done.stdout
    assert "Covid0000" not in done.stdout + done.stderr  # the NIH file's PatientID
    assert "warning: CXR_HASH_KEY is the published default" in done.stderr
    # no terminal (cron, CI): plain lines, not the bars' last frame
    assert re.search(r"^screening studies: (\d+)/\1 \(\d+:\d\d:\d\d\)$", done.stderr, re.M), (
        done.stderr
    )
    keyed = cli(
        "run",
        str(dicom_dir / "cxr"),
        "--database-url",
        sqlite_url,
        env_model=model_dir,
        CXR_HASH_KEY="a site secret of 32 characters....",
    )
    assert keyed.returncode == 0 and "CXR_HASH_KEY" not in keyed.stderr, keyed.stderr


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        (["run", ".", "--database-url", "nosuchdb://x"], {}, "invalid database URL"),
        (["run", ".", "--model", "/nonexistent/model"], {}, "no model card"),
        (["run", "/nonexistent/folder"], {}, "no such file or folder"),
        # an unset "$EXPORT": it screened the current folder, the results database included
        (["run", ""], {}, "an empty path was given (an unset variable?)"),
        (["ingest", ""], {}, "an empty path was given"),
        # "[/]" is rich markup: the message must show the path as it is, not fail on it
        (
            ["run", "/nonexistent/[old]/a[/]b"],
            {},
            "no such file or folder: /nonexistent/[old]/a[/]b",
        ),
        (
            ["run", "."],
            {"CXR_BATCH_SIZE": "abc"},
            "CXR_BATCH_SIZE: Input should be a valid integer",
        ),
        (["run", "."], {"CXR_LOG_LEVEL": "verbose"}, "CXR_LOG_LEVEL: not a log level"),
        (["run", "."], {"CXR_SETTINGS_FILE": "/nonexistent/cxr.env"}, "CXR_SETTINGS_FILE: no such"),
        # `sqlite:///$DBFILE` with DBFILE unset: screened in memory, reported, thrown away
        (["run", ".", "--database-url", "sqlite:///"], {}, "sqlite:/// is an in-memory database"),
        (["status", "--database-url", "sqlite://"], {}, "sqlite:// is an in-memory database"),
        # a URI filename: in memory it screened and kept nothing (exit 0), on a file it
        # failed on a lock file named "file:/path.lock"
        (
            ["run", ".", "--database-url", "sqlite:///file:mem1?mode=memory&uri=true"],
            {},
            "SQLite URI filenames (the uri parameter) are not supported",
        ),
        (
            ["run", ".", "--database-url", "sqlite:///file:/tmp/results.db?uri=true"],
            {},
            "name a file (sqlite:///path/to/results.db)",
        ),
        # a second line pointed at SQLAlchemy's error pages
        (
            ["run", ".", "--database-url", "postgresql+psycopg://postgres@127.0.0.1/no_such_db"],
            {},
            'failed: FATAL:  database "no_such_db" does not exist',
        ),
        (["ingest", "."], {"CXR_BROKER_URL": ""}, "CXR_BROKER_URL: empty"),
        # a flag's error named the variable it overrides, which an operator found unset
        (["run", ".", "--threshold", "5"], {}, "--threshold: Input should be less than 1"),
        (["worker", "--loglevel", "verbose"], {}, "--loglevel: not a log level"),
        # the message named the upgrade's lock file, "x.db.lock"
        (
            ["run", ".", "--database-url", "sqlite:////no-such-dir/x.db"],
            {},
            "no folder /no-such-dir for the SQLite database sqlite:////no-such-dir/x.db",
        ),
    ],
)
def test_cli_errors_are_one_clear_line(
    args: list[str], settings: dict[str, str], message: str, model_dir: Path, sqlite_url: str
) -> None:
    if "--database-url" not in args:
        args = [*args, "--database-url", sqlite_url]
    done = cli(*args, env_model=model_dir, **settings)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], done.stderr
    assert not any(line.startswith("reading headers") for line in lines), "no zero counts"
    assert "sqlalche.me" not in done.stderr


def test_an_unexpected_error_is_a_traceback_and_exit_70_not_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    """Exit 1 is "nothing to report" to a cron job around ``report``: a crash with the
    same status passed for a quiet night."""

    def a_bug(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("worker.cli.upgrade", a_bug)
    monkeypatch.setattr(sys, "argv", ["cxr-screen", "db", "upgrade", "--database-url", sqlite_url])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 70
    err = capsys.readouterr().err
    assert "RuntimeError: a bug" in err and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected error: this is a bug")


def test_a_model_that_does_not_load_stops_run_with_one_line(
    dicom_dir: Path, sqlite_url: str, model_dir: Path, tmp_path: Path
) -> None:
    """A Git LFS pointer in place of model.tflite: the pool processes died in their
    initializer and run ended with a 57-line traceback and exit 1."""
    broken = tmp_path / "model"
    broken.mkdir()
    shutil.copy(model_dir / "model_card.json", broken)
    (broken / "model.tflite").write_text("version https://git-lfs.github.com/spec/v1\n")
    done = cli("run", str(dicom_dir / "cxr"), "--database-url", sqlite_url, env_model=broken)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("model.tflite is not a TFLite model: The model is not a valid Flatbuffer buffer")
    )


def test_header_text_longer_than_the_standard_allows_is_stored_cut(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """PostgreSQL refused such rows and the whole run stopped; SQLite stored them whole."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    ds = base_dataset(png_pixels(png), view="AP ERECT PORTABLE")
    ds.AccessionNumber = "A" * 70
    write(ds, tmp_path / "export" / "long.dcm")
    write(base_dataset(png_pixels(png)), tmp_path / "export" / "plain.dcm")
    run([tmp_path / "export"], settings_for(database_url, model_dir))
    assert rows(database_url, "SELECT view_position, status FROM predictions ORDER BY source") == [
        ("AP ERECT PORTABL", "screened"),
        ("PA", "screened"),
    ]
    accessions = rows(database_url, "SELECT accession_number FROM studies")
    assert sorted(len(a) for (a,) in accessions) == [7, 64]


def test_header_text_and_reasons_with_nul_bytes_are_stored_without_them(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """PostgreSQL refuses a NUL in text: ingest, run and the worker stopped on such a file."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    ds = base_dataset(png_pixels(png), view="AP\x00PORTABLE")
    ds.AccessionNumber = "ACC\x00123"
    write(ds, tmp_path / "export" / "nul.dcm")
    # The rejection reason would quote the header: it names it unprintable instead.
    write(base_dataset(png_pixels(png), modality="M\x00R"), tmp_path / "export" / "mr.dcm")
    settings = settings_for(database_url, model_dir)
    studies = "SELECT accession_number, status, reason FROM studies ORDER BY accession_number"
    ingest([tmp_path / "export"], settings, [].append, sessions=open_database(database_url))
    assert rows(database_url, studies) == [("ACC0001", "queued", None), ("ACC123", "queued", None)]
    run([tmp_path / "export"], settings)
    reason = "modality (unprintable value) is not a radiograph (CR/DX)"
    assert rows(database_url, studies) == [
        ("ACC0001", "rejected", reason),
        ("ACC123", "screened", None),
    ]
    instances = "SELECT view_position, modality, status, reason FROM predictions ORDER BY source"
    assert rows(database_url, instances) == [
        ("PA", "MR", "rejected", reason),
        ("APPORTABLE", "CR", "screened", None),
    ]


def test_a_named_pipe_or_a_device_in_an_export_is_a_rejected_row_not_a_hang(
    sqlite_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """Discovery opened them like files: run (and ingest) waited for ever."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    film = write(base_dataset(png_pixels(png)), tmp_path / "elsewhere" / "film.dcm")
    export = tmp_path / "export"
    export.mkdir()
    (export / "film.dcm").symlink_to(film)  # a link to a regular file still counts
    os.mkfifo(export / "pipe")
    (export / "zero").symlink_to("/dev/zero")
    command = [sys.executable, "-m", "worker", "run", str(export), "--database-url", sqlite_url]
    env = {**os.environ, "CXR_MODEL": str(model_dir)}
    with subprocess.Popen(command, env=env, start_new_session=True) as process:
        try:
            assert process.wait(timeout=120) == 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    not_regular = "not a regular file"
    assert rows(sqlite_url, "SELECT source, status, reason FROM predictions ORDER BY 1") == [
        (str(export / "film.dcm"), "screened", None),
        (str(export / "pipe"), "rejected", not_regular),
        (str(export / "zero"), "rejected", not_regular),
    ]


def test_a_file_read_after_it_was_unreadable_keeps_one_row(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """Unreadable, a file's row is keyed by its path; readable, by its SOP Instance UID.
    Re-running after the file is mended must not leave both rows; once it is screened,
    a copy caught half-written by a later run leaves its result alone, as ingest does
    (its row was replaced by a rejected one, and the study went on counting the film)."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    path = write(base_dataset(png_pixels(png)), tmp_path / "export" / "film.dcm")
    whole = path.read_bytes()
    settings = settings_for(database_url, model_dir)
    query = "SELECT status, sop_instance_uid IS NULL FROM predictions"
    for content, expected in [
        (whole[:200], ("rejected", True)),
        (whole, ("screened", False)),
        (whole[:200], ("screened", False)),
    ]:
        path.write_bytes(content)
        summary = run([tmp_path / "export"], settings)
        assert rows(database_url, query) == [expected]
    assert summary.rejected_files == 1, "this run could not read it"
    studies = "SELECT status, n_instances, n_screened FROM studies"
    assert rows(database_url, studies) == [("screened", 1, 1)]


def test_a_screened_copy_caught_half_written_keeps_its_row(
    sqlite_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A copy of an instance has a row of its own, keyed by its path: a later run that
    could not read it replaced that row with one belonging to no study."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    first = write(base_dataset(png_pixels(png)), tmp_path / "export" / "a.dcm")
    shutil.copy(first, tmp_path / "export" / "b.dcm")
    settings = settings_for(sqlite_url, model_dir)
    run([tmp_path / "export"], settings)
    query = "SELECT source, status, study_instance_uid IS NULL FROM predictions ORDER BY 1"
    before = rows(sqlite_url, query)
    (copy,) = rows(sqlite_url, "SELECT source FROM predictions WHERE sop_instance_uid IS NULL")
    Path(copy[0]).write_bytes(first.read_bytes()[:200])
    run([tmp_path / "export"], settings)
    assert rows(sqlite_url, query) == before


def test_a_film_replaced_in_the_export_loses_its_old_row_and_one_removed_keeps_its_own(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A film replaced by another instance at the same path left its old row beside the
    new one. A film no longer in the export (exports are removed once read) keeps its
    row and still counts in its study; so does a study the run does not see."""
    pngs = sorted((cxr_dir / "test" / "normal").glob("*.png"))[:4]
    study, other = "1.2.826.0.1.3680043.10.3.1", "1.2.826.0.1.3680043.10.3.2"
    export, earlier = tmp_path / "export", tmp_path / "earlier"
    for png, name in zip(pngs[:3], ("a.dcm", "b.dcm", "c.dcm"), strict=True):
        write(base_dataset(png_pixels(png), study_uid=study), export / name)
    write(base_dataset(png_pixels(pngs[3]), study_uid=other), earlier / "d.dcm")
    settings = settings_for(database_url, model_dir)
    run([export, earlier], settings)
    removed = dcmread(export / "a.dcm").SOPInstanceUID

    (export / "a.dcm").unlink()
    write(base_dataset(png_pixels(pngs[3]), study_uid=study), export / "b.dcm")
    run([export], settings)
    now = {str(export / n): dcmread(export / n).SOPInstanceUID for n in ("b.dcm", "c.dcm")}
    found = rows(
        database_url,
        f"SELECT source, sop_instance_uid FROM predictions WHERE study_instance_uid = '{study}'",
    )
    assert dict(found) == {**now, str(export / "a.dcm"): removed}
    studies = "SELECT study_instance_uid, n_instances, n_screened FROM studies ORDER BY 1"
    assert rows(database_url, studies) == [(study, 3, 3), (other, 1, 1)]


def test_a_study_screened_in_two_exports_keeps_the_result_of_both(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A covid film tonight, its study's late normal film in tomorrow's export (tonight's
    removed by then): the study's result was the late film's alone, normal."""
    covid = sorted((cxr_dir / "test" / "covid").glob("*.png"))[0]
    normal = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    study = "1.2.826.0.1.3680043.10.5.1"
    settings = settings_for(database_url, model_dir)
    for day, png in (("day1", covid), ("day2", normal)):
        write(base_dataset(png_pixels(png), study_uid=study), tmp_path / day / "film.dcm")
        run([tmp_path / day], settings)
        shutil.rmtree(tmp_path / day)
    (found,) = rows(
        database_url, "SELECT n_instances, n_screened, predicted_label, status FROM studies"
    )
    assert found == (2, 2, "covid", "screened")


def test_a_study_counts_its_own_films_only(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """Another study's covid film once at the same path was summed up into a normal
    study, and two copies of another study's instance counted as two."""
    covid = sorted((cxr_dir / "test" / "covid").glob("*.png"))[0]
    normal = sorted((cxr_dir / "test" / "normal").glob("*.png"))[:2]
    earlier, later, copies = (
        "1.2.826.0.1.3680043.10.6.1",
        "1.2.826.0.1.3680043.10.6.2",
        "1.2.826.0.1.3680043.10.6.3",
    )
    export = tmp_path / "export"
    write(base_dataset(png_pixels(covid), study_uid=earlier), export / "IM1.dcm")
    settings = settings_for(database_url, model_dir)
    run([export], settings)
    shared_uid = dcmread(export / "IM1.dcm").SOPInstanceUID
    write(base_dataset(png_pixels(normal[0]), study_uid=later), export / "IM1.dcm")
    for name in ("c1.dcm", "c2.dcm"):
        ds = base_dataset(png_pixels(normal[1]), study_uid=copies)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared_uid
        write(ds, export / name)
    run([export], settings)
    found = rows(
        database_url,
        "SELECT study_instance_uid, n_instances, predicted_label FROM studies ORDER BY 1",
    )
    assert found == [(earlier, 1, "covid"), (later, 1, "normal"), (copies, 1, "normal")]


def test_a_file_whose_path_the_results_cannot_hold_is_a_rejected_row_not_the_end_of_the_run(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A Latin-1 folder name (surrogates no driver encodes) ended the run with a
    traceback on both databases; a path over 2,704 bytes failed on PostgreSQL's index."""
    pngs = sorted((cxr_dir / "test" / "normal").glob("*.png"))[:3]
    export = tmp_path / "export"
    latin1 = Path(os.fsdecode(bytes(export) + b"/M\xfcller_Hans"))
    deep = export.joinpath(*["d" * 200] * 11)
    for png, folder in zip(pngs, (export / "plain", latin1, deep), strict=True):
        write(base_dataset(png_pixels(png)), folder / "film.dcm")
    summary = run([export], settings_for(database_url, model_dir))
    assert (summary.files, summary.screened, summary.rejected_files) == (3, 1, 2)
    found = rows(database_url, "SELECT source, status, reason_code, reason FROM predictions")
    (plain,) = [r for r in found if r[0].endswith("/plain/film.dcm")]
    (latin,) = [r for r in found if "/M\\xfcller_Hans/" in r[0]]
    assert plain[1] == "screened"
    assert latin[1:] == (
        "rejected",
        "unsupported",
        "file name is not valid UTF-8 (rename it to screen it)",
    )
    (long_row,) = [r for r in found if r[0].endswith("...")]
    assert long_row[1:3] == ("rejected", "unsupported") and "bytes is longer than" in long_row[3]


def test_two_studies_sharing_a_sop_instance_uid_keep_a_row_each(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A SOP Instance UID must be unique, but re-identified or badly merged exports
    reuse one across studies. The UID-keyed row belongs to the study that wrote it
    first; the other study's file keeps a row of its own, keyed by its path."""
    pngs = sorted((cxr_dir / "test" / "normal").glob("*.png"))[:2]
    study_a, study_b = "1.2.826.0.1.3680043.10.2.1", "1.2.826.0.1.3680043.10.2.2"
    shared_uid = "1.2.826.0.1.3680043.10.2.99"
    for png, study, name in [(pngs[0], study_a, "a.dcm"), (pngs[1], study_b, "b.dcm")]:
        ds = base_dataset(png_pixels(png), study_uid=study)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared_uid
        write(ds, tmp_path / "export" / name)
    settings = settings_for(database_url, model_dir)
    query = (
        "SELECT study_instance_uid, status, sop_instance_uid, duplicate_of, reason_code, "
        "covid_probability FROM predictions ORDER BY study_instance_uid"
    )
    run([tmp_path / "export"], settings)
    first = rows(database_url, query)
    assert [(r[0], r[1]) for r in first] == [(study_a, "screened"), (study_b, "screened")]
    holder = [r for r in first if r[2] == shared_uid]
    copy = [r for r in first if r[2] is None]
    assert len(holder) == 1 and len(copy) == 1, first
    assert copy[0][3:5] == (shared_uid, "duplicate_instance")
    assert holder[0][3:5] == (None, None)
    assert first[0][5] != first[1][5], "each file keeps its own score"
    studies = rows(database_url, "SELECT n_instances, n_screened FROM studies")
    assert studies == [(1, 1), (1, 1)]

    run([tmp_path / "export"], settings)
    assert rows(database_url, query) == first, "a re-run keeps the same rows and holder"


def test_a_copy_of_an_instance_in_its_study_counts_once_and_its_reason_names_no_path(
    sqlite_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    ds = base_dataset(png_pixels(png))
    for folder in ("Doe^Jane", "resent"):  # exports name folders after the patient
        write(ds, tmp_path / "export" / folder / "1.dcm")
    run([tmp_path / "export"], settings_for(sqlite_url, model_dir))
    query = "SELECT source, duplicate_of, reason_code, reason FROM predictions ORDER BY 1"
    counted, copy = rows(sqlite_url, query)
    assert counted[1:] == (None, None, None)
    assert copy[1:3] == (ds.SOPInstanceUID, "duplicate_instance")
    assert "Doe^Jane" not in copy[3] and "another file of the study" in copy[3]
    assert rows(sqlite_url, "SELECT n_instances, n_screened FROM studies") == [(1, 1)]


def test_a_folder_of_copies_screened_alone_leaves_the_first_files_a_row(
    database_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """The UID's row moved to the copy's path and the original file, still in its export,
    was left without a row; screened the other way round, the copies lost theirs."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    ds = base_dataset(png_pixels(png))
    original, copy = tmp_path / "export" / "1.dcm", tmp_path / "resent" / "copy.dcm"
    write(ds, original), write(ds, copy)
    settings = settings_for(database_url, model_dir)
    query = "SELECT source, sop_instance_uid, duplicate_of FROM predictions ORDER BY 1"
    for folders in ([original.parent, copy.parent], [copy.parent], [original.parent]):
        run(folders, settings)
        found = {Path(r[0]).name: r[1:] for r in rows(database_url, query)}
        assert sorted(found) == ["1.dcm", "copy.dcm"], folders
        assert set(found.values()) == {(None, ds.SOPInstanceUID), (ds.SOPInstanceUID, None)}
        assert rows(database_url, "SELECT n_instances, n_screened FROM studies") == [(1, 1)]


def test_the_results_database_in_the_folder_screened_is_not_taken_for_films(
    cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """`cxr-screen run .` where cxr-screen.db is (the default URL): the database, its
    WAL, shared memory and lock file each got a rejected row, at every run."""
    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    export = tmp_path / "export"
    write(base_dataset(png_pixels(png)), export / "film.dcm")
    url = f"sqlite:///{export / 'cxr-screen.db'}"
    for _ in range(2):
        summary = run([export], settings_for(url, model_dir))
        assert summary.files == 1 and summary.rejected_files == 0
    assert rows(url, "SELECT source, status FROM predictions") == [
        (str(export / "film.dcm"), "screened")
    ]


def test_the_summary_counts_files_rejected_before_any_study_and_warns_of_an_empty_folder(
    sqlite_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A PNG given to run got a rejected row, and a summary whose counts were all zero."""
    from typer.testing import CliRunner

    from worker.cli import app

    png = sorted((cxr_dir / "test" / "normal").glob("*.png"))[0]
    write(base_dataset(png_pixels(png)), tmp_path / "export" / "1.dcm")
    shutil.copy(png, tmp_path / "export" / "film.png")
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    args = ["--database-url", sqlite_url, "--model", str(model_dir), "--workers", "1"]
    result = runner.invoke(app, ["run", str(tmp_path / "export"), *args])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    (header,) = [line.strip("┃ ").split("┃") for line in lines if line.startswith("┃")]
    (counts,) = [line.strip("│ ").split("│") for line in lines if line.startswith("│")]
    names, cells = [c.strip() for c in header], [c.strip() for c in counts]
    assert dict(zip(names, cells, strict=True)) == {
        "files": "2",
        "files rejected": "1",
        "studies": "1",
        "screened": "1",
        "rejected": "0",
        "failed": "0",
        "positive": "0",
    }
    empty = runner.invoke(app, ["run", str(tmp_path / "empty"), *args])
    assert empty.exit_code == 0 and "no file under the given paths" in empty.output


def pool_children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_run_stopped_midway_stops_its_pool_and_keeps_what_it_saved(
    how: signal.Signals, cxr_dir: Path, tmp_path: Path, sqlite_url: str, model_dir: Path
) -> None:
    """Ctrl-C or `kill` left the pool screening every remaining study for nothing (and,
    past about 1,000 of them, hanging for good on a full pipe); a killed main process left
    its pool processes waiting under PID 1 for ever."""
    from tests.worker.processes import wait_for
    from tests.worker.test_faults import make_studies

    n = 300
    make_studies(tmp_path / "export", cxr_dir, n, 1)
    env = {**os.environ, "CXR_MODEL": str(model_dir), "CXR_DATABASE_URL": sqlite_url}
    main = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", str(tmp_path / "export"), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    saved = "SELECT count(*) FROM studies"
    try:
        wait_for(lambda: Path(sqlite_url.removeprefix("sqlite:///")).exists(), 60, "the database")
        wait_for(lambda: rows(sqlite_url, saved)[0][0] >= 10, 120, "the first studies")
        children = pool_children(main.pid)
        assert len(children) == 2, children
        main.send_signal(how)
        _, stderr = main.communicate(timeout=60)
        wait_for(lambda: not any(alive(c) for c in children), 30, "the pool processes to end")
    finally:
        main.kill()
    kept = rows(sqlite_url, saved)[0][0]
    assert 10 <= kept < n, kept
    assert rows(sqlite_url, "SELECT count(*) FROM studies WHERE status <> 'screened'") == [(0,)]
    assert rows(sqlite_url, "SELECT count(*) FROM predictions") == [(kept,)]
    if how != signal.SIGKILL:
        assert main.returncode == 130, stderr[-2000:]
        assert "interrupted: the studies finished so far are saved" in " ".join(stderr.split())
        assert "Traceback" not in stderr


@pytest.mark.services
def test_a_run_saves_through_a_database_connection_that_was_cut(
    postgres_url: str, cxr_dir: Path, tmp_path: Path, model_dir: Path
) -> None:
    """A dropped PostgreSQL connection (a failover, an idle-connection killer) ended the
    whole run with a traceback; the worker retries it, run now does too."""
    from worker.runner import Progress, Results, RunSummary
    from worker.screening import failed_outcome

    sessions = open_database(postgres_url)
    results = Results(
        sessions, settings_for(postgres_url, model_dir), "m-1", RunSummary(), Progress()
    )
    results.save(failed_outcome("1.2.826.0.1.3680043.10.99.1", ["/x/1.dcm"], "m-1", "first"))
    killer = create_engine(postgres_url)  # not the run's pool: its connection is the one cut
    with killer.begin() as connection:
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    killer.dispose()
    results.save(failed_outcome("1.2.826.0.1.3680043.10.99.2", ["/x/2.dcm"], "m-1", "second"))
    sessions.kw["bind"].dispose()
    assert results.summary.studies == 2
    assert rows(postgres_url, "SELECT count(*) FROM studies") == [(2,)]


def test_db_upgrade_creates_the_schema_once_and_then_changes_nothing(database_url: str) -> None:
    """The compose file's `migrate` service, which the workers wait for, runs it."""
    for _ in range(2):
        done = cli("db", "upgrade", "--database-url", database_url)
        assert done.returncode == 0, done.stderr
        # one line, however long the path: a message cut in two lines in a log
        assert done.stderr.splitlines() == [f"database {database_url} is at the latest schema"], (
            done.stderr
        )
    head = sorted((REPO_ROOT / "db" / "migrations" / "versions").glob("0*.py"))[-1]
    assert rows(database_url, "SELECT version_num FROM alembic_version") == [(head.name[:4],)]
    assert rows(database_url, "SELECT count(*) FROM studies") == [(0,)]
    for view in ("daily_summary", "positive_studies"):
        assert rows(database_url, f"SELECT count(*) FROM {view}") == [(0,)]
