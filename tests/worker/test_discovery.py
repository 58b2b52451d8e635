"""Discovery: a PACS export given as files, folders or a DICOMDIR, grouped by study."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from tests.dicom_factory import base_dataset, png_pixels, write
from worker.discovery import discover, walk
from worker.imaging.dicom import check_regular_file
from worker.imaging.errors import RejectedInput


@pytest.fixture(scope="module")
def pixels(cxr_dir: Path) -> np.ndarray:
    return png_pixels(sorted((cxr_dir / "test" / "normal").glob("*.png"))[0])


def instance(pixels: np.ndarray, study_uid: str, number: int) -> Dataset:
    ds = base_dataset(pixels, study_uid=study_uid)
    # What a DICOMDIR's study, series and image records need.
    ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "120000", "1", 1, number
    return ds


def media(folder: Path, datasets: list[Dataset]) -> Path:
    """A DICOM file set as pydicom writes one (PT000000/ST000000/...), with its DICOMDIR."""
    fileset = FileSet()
    for ds in datasets:
        fileset.add(ds)
    fileset.write(folder)
    return folder / "DICOMDIR"


def test_a_dicomdir_given_alone_brings_in_the_files_it_references(
    pixels: np.ndarray, tmp_path: Path
) -> None:
    first, second = generate_uid(), generate_uid()
    datasets = [instance(pixels, first, 1), instance(pixels, first, 2), instance(pixels, second, 1)]
    dicomdir = media(tmp_path / "media", datasets)
    found = discover([dicomdir])
    assert {uid: len(study.files) for uid, study in found.studies.items()} == {first: 2, second: 1}
    assert [(r.source, r.reason_code) for r in found.rejected] == [(str(dicomdir), "unreadable")]


def test_a_dicomdir_beside_its_files_reads_each_file_once(
    pixels: np.ndarray, tmp_path: Path
) -> None:
    study = generate_uid()
    media(tmp_path / "media", [instance(pixels, study, 1), instance(pixels, study, 2)])
    found = discover([tmp_path / "media"])
    assert len(found.studies[study].files) == 2 and found.n_files == 3


def test_a_dicomdir_reference_outside_its_folder_is_not_followed(
    pixels: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Record paths are relative to the DICOMDIR's folder by the standard; a broken or
    crafted one must not make the worker read (and store results for) files elsewhere."""
    study, elsewhere = generate_uid(), generate_uid()
    dicomdir = media(tmp_path / "media", [instance(pixels, study, 1), instance(pixels, study, 2)])
    outside = write(instance(pixels, elsewhere, 1), tmp_path / "outside" / "IM000000")
    ds = dcmread(dicomdir)
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    images[0].ReferencedFileID = ["..", "outside", "IM000000"]
    images[1].ReferencedFileID = list(outside.parts)  # an absolute path
    ds.save_as(dicomdir)
    with caplog.at_level(logging.WARNING):
        found = discover([dicomdir])
    assert found.studies == {} and found.n_files == 1
    assert "a DICOMDIR references 2 files outside its folder; not read" in caplog.text


def test_missing_files_a_dicomdir_references_are_logged_and_skipped(
    pixels: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Also a name too long for the file system: its OSError, path and all, was the
    DICOMDIR's reason, and none of the files it references was read."""
    study = generate_uid()
    datasets = [instance(pixels, study, n) for n in (1, 2, 3)]
    dicomdir = media(tmp_path / "DOE^JANE", datasets)
    next((tmp_path / "DOE^JANE").glob("PT*/ST*/SE*/IM*")).unlink()
    ds = dcmread(dicomdir)
    images = [r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    images[-1].ReferencedFileID = ["A" * 300, "IM000000"]
    ds.save_as(dicomdir)
    with caplog.at_level(logging.WARNING):
        found = discover([dicomdir])
    assert len(found.studies[study].files) == 1
    assert [r.reason_code for r in found.rejected] == ["unreadable"]  # the DICOMDIR itself
    assert "DOE^JANE" not in found.rejected[0].reason
    assert "a DICOMDIR references 2 files that are not there" in caplog.text


def test_linked_study_folders_are_walked_once_and_a_link_loop_ends(
    pixels: np.ndarray, tmp_path: Path
) -> None:
    """Exports assembled from links (a study folder linked in from the archive) lost
    those studies without a row: the walk did not follow links to folders."""
    study = generate_uid()
    archive = tmp_path / "archive" / "study"
    for number in (1, 2):
        write(instance(pixels, study, number), archive / f"{number}.dcm")
    export = tmp_path / "export"
    export.mkdir()
    (export / "ward7").symlink_to(archive)
    (export / "ward9").symlink_to(archive)  # the same folder under a second name
    (export / "loop").symlink_to(export)
    (export / ".snapshot").symlink_to(archive)  # hidden, as before
    found = discover([export])
    assert sorted(found.studies[study].files) == [
        str(export / "ward7" / f"{n}.dcm") for n in (1, 2)
    ]
    assert found.n_files == 2


def test_a_loop_of_file_links_is_rejected_and_the_rest_is_found(
    pixels: np.ndarray, tmp_path: Path
) -> None:
    """``a -> b -> a``: Path.resolve raised RuntimeError (Python 3.11), which ended the
    run with a traceback and no row for any file of the export."""
    study = generate_uid()
    export = tmp_path / "export"
    write(instance(pixels, study, 1), export / "1.dcm")
    (export / "a").symlink_to("b")
    (export / "b").symlink_to("a")
    found = discover([export])
    assert list(found.studies) == [study] and found.n_files == 3
    rejected = sorted((Path(r.source).name, r.reason_code) for r in found.rejected)
    assert rejected == [("a", "unreadable"), ("b", "unreadable")]


def test_a_link_to_a_folder_around_the_export_is_not_followed(
    pixels: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``up -> ..`` would walk every export beside this one (``/`` the whole disk)."""
    study, beside = generate_uid(), generate_uid()
    export = tmp_path / "exports" / "today"
    write(instance(pixels, study, 1), export / "1.dcm")
    write(instance(pixels, beside, 1), tmp_path / "exports" / "other-hospital" / "1.dcm")
    (export / "up").symlink_to("..")
    (export / "root").symlink_to("/")
    with caplog.at_level(logging.WARNING):
        found = discover([export])
    assert list(found.studies) == [study] and found.n_files == 1
    assert caplog.text.count("a link to a folder that holds the folder being walked") == 2


def deep_folder(top: Path, depth: int) -> Path:
    """Nested folders whose full path is longer than PATH_MAX (4096 bytes on Linux): made
    relative to an open parent, as nothing can name the deepest ones in full."""
    fd = os.open(top, os.O_RDONLY)
    path = top
    try:
        for _ in range(depth):
            name = "d" * 250
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd, path = inner, path / name
    finally:
        os.close(fd)
    return path


def test_a_folder_whose_files_cannot_be_listed_gets_a_row_instead_of_vanishing(
    pixels: np.ndarray, tmp_path: Path
) -> None:
    """os.walk skips a folder it cannot list (permissions, or a path past PATH_MAX as
    here) without a word: its studies were lost with no trace in the results."""
    study = generate_uid()
    write(instance(pixels, study, 1), tmp_path / "export" / "1.dcm")
    deepest = deep_folder(tmp_path / "export", 20)
    found = discover([tmp_path / "export"])
    assert list(found.studies) == [study]
    ((unlisted, code),) = [(r.source, r.reason_code) for r in found.rejected]
    # past PATH_MAX, so past what the results index too: named cut, with "..."
    assert str(deepest).startswith(unlisted.removesuffix("...")) and code == "unsupported"
    shutil.rmtree(tmp_path / "export", ignore_errors=True)  # pytest cannot remove it either


def test_a_folder_read_as_a_file_is_named_as_such(tmp_path: Path) -> None:
    """What the read says of a folder the walk could not list (without root's rights)."""
    with pytest.raises(RejectedInput, match="a folder whose files cannot be listed"):
        check_regular_file(tmp_path)


def test_one_file_has_one_name_however_the_export_is_spelled(
    pixels: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are keyed by path where a file has no UID: `run export/../export` wrote a
    second row for each such file, and the README's `WHERE source = ...` missed both."""
    study = generate_uid()
    write(instance(pixels, study, 1), tmp_path / "export" / "1.dcm")
    (tmp_path / "export" / "notes.txt").write_text("not DICOM")
    monkeypatch.chdir(tmp_path / "export")
    spellings = [
        tmp_path / "export",
        tmp_path / "export" / ".." / "export",
        Path("."),
        Path("..") / "export",
    ]
    names = set()
    for spelling in spellings:
        found = discover([spelling])
        names.add((tuple(found.studies[study].files), tuple(r.source for r in found.rejected)))
    export = str(tmp_path / "export")
    assert names == {((f"{export}/1.dcm",), (f"{export}/notes.txt",))}


def test_dot_dot_after_a_link_keeps_the_path_as_given(pixels: np.ndarray, tmp_path: Path) -> None:
    """After a link, `..` is the link target's parent: collapsing it as text named a
    file that does not exist (an `unreadable` row for a valid study)."""
    study = generate_uid()
    write(instance(pixels, study, 1), tmp_path / "real" / "sub" / "a.dcm")
    (tmp_path / "real" / "sub" / "deeper").mkdir()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "link").symlink_to(tmp_path / "real" / "sub" / "deeper")
    found = discover([tmp_path / "export" / "link" / ".."])
    assert found.studies[study].files == [str(tmp_path / "export" / "link" / ".." / "a.dcm")]
    assert not found.rejected


def test_desktop_files_are_not_films_in_a_folder_or_named_alone(tmp_path: Path) -> None:
    for name in ("0001.dcm", "Thumbs.db", "desktop.ini", ".DS_Store"):
        (tmp_path / "export" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "export" / "sub" / name).write_bytes(b"x")
    export = tmp_path / "export"
    assert list(walk([export])) == [str(export / "sub" / "0001.dcm")]
    assert list(walk([export / "sub" / "Thumbs.db"])) == []
