from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.predict import COLUMNS, predict_paths, predict_to_csv, write_csv


def _rows(paths: list[Path], model: Path) -> list[dict[str, str]]:
    buffer = io.StringIO()
    write_csv(predict_paths(paths, model), buffer)
    return list(csv.DictReader(io.StringIO(buffer.getvalue())))


def test_png_jpeg_and_dicom_are_screened(
    shipped_model: Path, sample_png: Path, dicom_files: list[Path], tmp_path: Path
) -> None:
    jpeg = tmp_path / "film.jpg"
    Image.open(sample_png).convert("L").save(jpeg, quality=92)
    rows = _rows([sample_png, jpeg, *dicom_files], shipped_model)
    assert len(rows) == 2 + len(dicom_files)
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        assert row["status"] == "screened", row
        assert row["reason"] == ""
        prob = float(row["covid_probability"])
        assert 0.0 <= prob <= 1.0
        assert row["predicted_label"] in {"normal", "covid"}
    # same picture as PNG and as JPEG -> nearly the same probability
    assert abs(float(rows[0]["covid_probability"]) - float(rows[1]["covid_probability"])) < 0.1


def test_the_reader_is_chosen_by_content_not_by_the_file_name(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    """A PNG with no extension or named .dcm was "not a DICOM file", a DICOM named .png
    "not an image format Pillow reads"; WebP and GIF went to the DICOM reader."""
    from tests.dicom_factory import base_dataset, png_pixels, write

    picture = Image.open(sample_png).convert("L")
    names = {"no_extension": "PNG", "film.dcm": "PNG", "film.webp": "WEBP", "film.gif": "GIF"}
    for name, kind in names.items():
        picture.save(tmp_path / name, format=kind, **({"lossless": True} if kind == "WEBP" else {}))
    write(base_dataset(png_pixels(sample_png)), tmp_path / "dicom.png")
    rows = {Path(r["path"]).name: r for r in _rows([sample_png, tmp_path], shipped_model)}
    reference = float(rows[sample_png.name]["covid_probability"])
    for name in (*names, "dicom.png"):
        assert rows[name]["status"] == "screened", rows[name]
        assert abs(float(rows[name]["covid_probability"]) - reference) < 0.01, name


def test_bad_files_are_rejected_not_fatal(
    shipped_model: Path, sample_png: Path, bad_files: dict[str, Path], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.png"
    thumbnail = tmp_path / "thumbnail.png"
    Image.open(sample_png).resize((40, 40)).save(thumbnail)
    rows = _rows(
        [
            bad_files["empty"],
            sample_png,
            bad_files["text"],
            bad_files["truncated_dicom"],
            missing,
            thumbnail,
        ],
        shipped_model,
    )
    status = {Path(r["path"]).name: r for r in rows}
    assert status[sample_png.name]["status"] == "screened"
    assert "too small" in status["thumbnail.png"]["reason"]
    for name in ("empty.png", "notes.txt", "truncated.dcm", "missing.png", "thumbnail.png"):
        assert status[name]["status"] == "rejected"
        assert status[name]["reason"]
        assert status[name]["covid_probability"] == ""


def test_folders_are_walked_recursively(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    Image.open(sample_png).save(nested / "x.png")
    (tmp_path / "a" / "readme.txt").write_text("hello")
    (tmp_path / "a" / ".hidden").write_text("skip me")
    for desktop_file in ("Thumbs.db", "desktop.ini"):  # Windows Explorer's, never a film
        (nested / desktop_file).write_text("skip me")
    (tmp_path / "a" / "moved.png").symlink_to(tmp_path / "gone.png")
    rows = {Path(r["path"]).name: r for r in _rows([tmp_path / "a"], shipped_model)}
    assert sorted(rows) == ["moved.png", "readme.txt", "x.png"]
    assert rows["moved.png"]["status"] == "rejected"
    assert "broken symbolic link" in rows["moved.png"]["reason"]


def test_the_csv_written_inside_a_walked_folder_is_not_scored(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    """``predict DIR --csv DIR/out.csv`` gave its own output file a rejected row; and
    comparing a link loop with it raised RuntimeError (Path.resolve, Python 3.11): a
    traceback and no rows."""
    (tmp_path / "x.png").symlink_to(sample_png)
    (tmp_path / "loop.png").symlink_to("loop.png")
    out = tmp_path / "out.csv"
    assert predict_to_csv([tmp_path / "."], shipped_model, out) == 2
    rows = list(csv.DictReader(out.open()))
    assert [(Path(r["path"]).name, r["status"]) for r in rows] == [
        ("loop.png", "rejected"),
        ("x.png", "screened"),
    ]


def test_linked_sub_folders_are_walked_once_each(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    scans, elsewhere = tmp_path / "scans", tmp_path / "elsewhere"
    for folder in (scans, elsewhere):
        folder.mkdir()
    for name in ("z.png", "a.png"):
        (elsewhere / name).symlink_to(sample_png)
    (scans / "m.png").symlink_to(sample_png)
    (scans / "ward7").symlink_to(elsewhere)
    (scans / "ward9").symlink_to(elsewhere)
    (scans / "loop").symlink_to(scans)
    (scans / ".backup").symlink_to(elsewhere)  # hidden: must not take ward7's place
    rows = _rows([scans], shipped_model)
    assert [Path(r["path"]).relative_to(scans).as_posix() for r in rows] == [
        "m.png",
        "ward7/a.png",
        "ward7/z.png",
    ]
    assert {r["status"] for r in rows} == {"screened"}


def test_predict_matches_the_classifier_on_model_input(
    shipped_model: Path, sample_png: Path
) -> None:
    from worker.imaging.pipeline import load_gray, model_input
    from worker.model import Classifier

    clf = Classifier(shipped_model)
    expected = clf.predict(model_input(load_gray(sample_png), clf.input_size)[np.newaxis])[0]
    (row,) = _rows([sample_png], shipped_model)
    assert float(row["covid_probability"]) == pytest.approx(float(expected), abs=1e-6)


def test_csv_rows_survive_line_breaks_commas_quotes_and_tabs_in_file_names(
    shipped_model: Path, sample_png: Path, csv_awkward_names: tuple[str, ...], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in csv_awkward_names:
        (folder / name).symlink_to(sample_png)
    out = tmp_path / "out.csv"
    assert predict_to_csv([folder], shipped_model, out) == len(csv_awkward_names)
    assert out.read_bytes().startswith(",".join(COLUMNS).encode() + b"\n")
    with out.open(newline="", encoding="utf-8") as stream:
        header, *rows = csv.reader(stream)
    assert header == list(COLUMNS)
    assert sorted(Path(row[0]).name for row in rows) == sorted(csv_awkward_names)
    assert {len(row) for row in rows} == {len(COLUMNS)}
    assert {row[3] for row in rows} == {"screened"}


@pytest.fixture
def odd_names(sample_png: Path, tmp_path: Path) -> Path:
    """A folder with a film whose name is not UTF-8 (film<0xff>.png) and a plain z.png."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / os.fsdecode(b"film\xff.png")).symlink_to(sample_png)
    (folder / "z.png").symlink_to(sample_png)
    return folder


def test_csv_file_survives_a_file_name_that_is_not_utf8(
    shipped_model: Path, odd_names: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"
    assert predict_to_csv([odd_names], shipped_model, out) == 2
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    assert [Path(r["path"]).name for r in rows] == ["film\\udcff.png", "z.png"]
    assert {r["status"] for r in rows} == {"screened"}


def test_standard_output_survives_a_file_name_that_is_not_utf8(
    shipped_model: Path, odd_names: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "worker", "predict", str(odd_names), "--model", str(shipped_model)],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode("utf-8"))))
    assert [Path(r["path"]).name for r in rows] == ["film\\udcff.png", "z.png"]
    assert {r["status"] for r in rows} == {"screened"}


def deep_path(root: Path, name: str) -> None:
    """A file whose path is longer than PATH_MAX (made from inside, one level at a time)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(20):
            os.mkdir("x" * 250, dir_fd=fd)
            inner = os.open("x" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)


def test_reasons_never_quote_a_patient_named_path_and_a_deep_one_is_a_row(
    shipped_model: Path, tmp_path: Path
) -> None:
    """Pillow's "cannot identify image file '<path>'" went into the reason whole, and a
    path past PATH_MAX stopped predict with exit 2 and the path on stderr."""
    folder = tmp_path / "DOE^JOHN_MRN1234567"
    folder.mkdir()
    (folder / "scan.png").write_text("not a picture")
    deep_path(folder, "deep.png")
    rows = _rows([folder], shipped_model)
    assert [r["status"] for r in rows] == ["rejected", "rejected"], rows
    assert all("MRN1234567" not in r["reason"] for r in rows), [r["reason"] for r in rows]
    assert sorted(r["reason"] for r in rows) == [
        "unreadable: OSError: File name too long",
        "unreadable: not an image format Pillow reads",
    ]


def predict_cli(*args: str, **run: object) -> subprocess.CompletedProcess[bytes]:
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **run}
    return subprocess.run(  # type: ignore[call-overload]
        [sys.executable, "-m", "worker", "predict", *args], check=False, timeout=300, **streams
    )


def test_predict_names_a_missing_or_empty_path_instead_of_scoring_around_it(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    """A typo was a `rejected` row and exit 0; an unset "$DIR" screened the current folder."""
    for paths, message in (
        ([str(sample_png), str(tmp_path / "missing.png")], b"no such file or folder: "),
        ([""], b"an empty path was given"),
    ):
        done = predict_cli(*paths, "--model", str(shipped_model), cwd=tmp_path)
        assert done.returncode == 2 and done.stdout == b""
        assert done.stderr.startswith(b"error: " + message), done.stderr
    (tmp_path / "unmounted").mkdir()  # an empty CSV, and not a word
    done = predict_cli(str(tmp_path / "unmounted"), "--model", str(shipped_model))
    assert done.returncode == 0 and done.stdout.count(b"\n") == 1
    assert b"warning: no file under the given paths" in done.stderr, done.stderr


def test_a_file_given_twice_has_one_row_and_a_closed_pipe_ends_quietly(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    for n in range(40):
        (folder / f"{n:02d}.png").symlink_to(sample_png)
    rows = _rows([folder / "00.png", folder, folder / "00.png"], shipped_model)
    assert [Path(r["path"]).name for r in rows] == [f"{n:02d}.png" for n in range(40)]
    reader = subprocess.Popen(["head", "-n", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdin is not None
    done = predict_cli(str(folder), "--model", str(shipped_model), stdout=reader.stdin)
    reader.stdin.close()
    assert reader.wait() == 0
    assert done.returncode == 141 and b"Broken pipe" not in done.stderr, done.stderr


def test_the_csv_is_never_written_over_a_radiograph(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    """``predict --csv scans/*.png``: the wildcard's first film became the CSV of the
    others, exit 0."""
    films = [tmp_path / "a.png", tmp_path / "b.png"]
    for film in films:
        film.write_bytes(sample_png.read_bytes())
    done = predict_cli("--model", str(shipped_model), "--csv", *map(str, films))
    assert done.returncode == 2 and b"refusing to write over it" in done.stderr, done.stderr
    assert films[0].read_bytes() == sample_png.read_bytes()


def test_a_csv_in_a_folder_that_is_not_there_is_refused_not_made(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    """A typo in the folder made it (a root-level one as root), where ``report --out``
    refuses."""
    out = tmp_path / "no-such-folder" / "out.csv"
    done = predict_cli("--model", str(shipped_model), "--csv", str(out), str(sample_png))
    assert done.returncode == 2, done.stderr
    assert done.stderr.decode().strip() == f"error: no such folder for --csv: {out.parent}"
    assert not out.parent.exists()


def test_a_named_pipe_is_a_rejected_row_not_a_hang(shipped_model: Path, tmp_path: Path) -> None:
    """The content sniffing opened it before the regular-file check: predict waited for
    a writer for ever."""
    pipe = tmp_path / "scan.dcm"
    os.mkfifo(pipe)
    rows: list[dict[str, str]] = []
    reader = threading.Thread(target=lambda: rows.extend(_rows([pipe], shipped_model)))
    reader.start()
    reader.join(60)
    if reader.is_alive():
        while reader.is_alive():  # release each blocked open, then fail
            with suppress(OSError):
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(0.1)
        pytest.fail("predict blocked on a named pipe")
    assert [(r["status"], r["reason"]) for r in rows] == [
        ("rejected", "unreadable: not a regular file")
    ]


def test_one_file_named_in_several_spellings_has_one_row(
    shipped_model: Path, sample_png: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "a.png").write_bytes(sample_png.read_bytes())
    (tmp_path / "linked").symlink_to(folder)
    spellings = [
        folder / "a.png",
        folder / ".." / "films" / "a.png",
        tmp_path / "linked" / "a.png",
        Path(os.path.relpath(folder / "a.png")),
    ]
    assert len(_rows(spellings, shipped_model)) == 1


def test_jpeg_2000_pictures_are_listed_like_other_pictures(
    sample_png: Path, tmp_path: Path
) -> None:
    """evaluate and train left .jp2 files out unsaid, which predict scored."""
    from training.data import list_samples

    for label in ("normal", "covid"):
        (tmp_path / label).mkdir()
        Image.open(sample_png).convert("L").save(tmp_path / label / "film.jp2")
    assert [s.path.name for s in list_samples(tmp_path)] == ["film.jp2", "film.jp2"]
