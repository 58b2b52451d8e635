"""Finding the studies in a PACS export: walk files, folders and DICOMDIRs, read headers
only, and group instances by StudyInstanceUID (not by folder).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from pydicom.dataset import Dataset

from worker.imaging.dicom import (
    check_chest_radiograph,
    check_has_pixels,
    instance_header,
    is_dicomdir,
    malformed,
    read_dataset,
)
from worker.imaging.enum import RejectCode
from worker.imaging.errors import RejectedInput
from worker.screening import InstanceResult, rejected

log = logging.getLogger(__name__)

# Files the desktop writes beside images (Finder, Windows Explorer): never a film.
SKIPPED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# PostgreSQL indexes `predictions.source`, and a btree entry holds at most 2,704 bytes: a
# longer path failed its study's whole transaction. Linux allows 4,096.
MAX_SOURCE_BYTES = 2000


@dataclass
class StudyFiles:
    study_instance_uid: str
    instances: dict[str, str] = field(default_factory=dict)  # file -> SOP Instance UID
    accession_number: str | None = None

    @property
    def files(self) -> list[str]:
        return list(self.instances)


@dataclass
class Discovery:
    """Studies to screen, and files already rejected from their header alone."""

    studies: dict[str, StudyFiles] = field(default_factory=dict)
    rejected: list[InstanceResult] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        return sum(len(s.files) for s in self.studies.values()) + len(self.rejected)


def walk(paths: Iterable[str | Path], seen: set[str] | None = None) -> Iterator[str]:
    """Every file under the given files and folders, once, in a stable order. ``seen``
    collects each file's resolved path (for a caller that meets more files later)."""
    seen = set() if seen is None else seen
    for path in paths:
        root = Path(path)
        if root.is_file():
            candidates: Iterable[Path] = [] if root.name in SKIPPED_NAMES else [root]
        elif root.is_dir():
            candidates = sorted(tree_files(root))
        else:
            log.warning("no such file or folder: %s", root)
            continue
        for candidate in candidates:
            key = os.path.realpath(candidate)  # Path.resolve raises on a link loop (3.11)
            if key not in seen:
                seen.add(key)
                yield file_name(candidate)


def file_name(path: str | Path) -> str:
    """The name a file's row takes: absolute, ``.`` dropped, and ``..`` resolved where
    that still names the same file (after a link, ``..`` leads to the link target's
    parent: then the path stays as given), so that one file has one name however the
    folder was typed."""
    literal = str(Path(path).absolute())
    if ".." not in Path(literal).parts:
        return literal
    normal = os.path.normpath(literal)
    try:
        same = os.path.samefile(literal, normal)
    except OSError:  # one is missing: textual unless the path as given is a file
        same = not os.path.exists(literal)
    return normal if same else literal


def tree_files(folder: Path, *, skip_hidden_files: bool = False) -> Iterator[Path]:
    """Every entry under ``folder`` that is not a folder (files, links, pipes...) nor a
    desktop file (SKIPPED_NAMES), and each folder that cannot be listed, so that it is
    reported instead of skipped; hidden folders left out. Links to folders are followed,
    but each real folder is walked once, under the first name met in sorted order (so a
    link loop ends), and never a link to a folder that holds ``folder`` (``..``, ``/``):
    that walks all around it."""
    unlisted: list[Path] = []
    top, walked = folder.resolve(), {_identity(folder)}
    tree = os.walk(folder, followlinks=True, onerror=lambda e: unlisted.append(Path(e.filename)))
    for root, folders, files in tree:
        folders[:] = [
            name
            for name in sorted(folders)
            if not name.startswith(".") and _first_visit(Path(root, name), walked, top)
        ]
        yield from (
            Path(root, n)
            for n in files
            if n not in SKIPPED_NAMES and not (skip_hidden_files and n.startswith("."))
        )
        yield from unlisted
        unlisted.clear()
    yield from unlisted


def _identity(folder: Path) -> tuple[int, int]:
    status = folder.stat()
    return status.st_dev, status.st_ino


def _first_visit(folder: Path, walked: set[tuple[int, int]], top: Path) -> bool:
    try:
        identity = _identity(folder)
        # Only a link can lead to a folder around ``top``; resolving each real folder
        # cost a quarter more time on a large export.
        around = folder.is_symlink() and top.is_relative_to(folder.resolve())
    except OSError:  # gone, or past PATH_MAX: kept, for the walk to report it
        return True
    if around:
        log.warning("a link to a folder that holds the folder being walked is not followed")
        return False
    if identity in walked:
        return False
    walked.add(identity)
    return True


def discover(
    paths: Iterable[str | Path],
    on_file: Callable[[str], None] | None = None,
    skip: Iterable[str] = (),
) -> Discovery:
    """Header-only scan of every file; DICOMDIRs add the files they reference. ``skip``:
    files that are not the export's (the results database in a folder screened)."""
    found = Discovery()
    # resolved paths, so a DICOMDIR's files are not read twice
    seen = {os.path.realpath(path) for path in skip}
    queue = deque(walk(paths, seen))
    while queue:
        path = queue.popleft()
        if on_file is not None:
            on_file(path)
        if problem := unstorable_name(path):
            found.rejected.append(rejected(storable_name(path), RejectCode.UNSUPPORTED, problem))
            continue
        try:
            ds = read_dataset(path, pixels=False)
            if is_dicomdir(ds):
                _add_dicomdir(found, path, ds, queue, seen)
            else:
                _add_instance(found, path, ds)
        except RejectedInput as exc:
            found.rejected.append(rejected(path, exc.code, exc.reason))
        except Exception as exc:  # pydicom parses an element on first access; it may be corrupt
            rejection = malformed(exc)
            found.rejected.append(rejected(path, rejection.code, rejection.reason))
    return found


def unstorable_name(path: str) -> str | None:
    """Why the results tables cannot hold this path as it is, or None. A name in another
    encoding than UTF-8 (an old Latin-1 folder, ``M\\xfcller``) reaches Python as
    surrogates, which no database driver encodes."""
    try:
        size = len(path.encode())
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (rename it to screen it)"
    if size > MAX_SOURCE_BYTES:
        return f"path of {size} bytes is longer than the {MAX_SOURCE_BYTES} the results index"
    return None


def storable_name(path: str) -> str:
    """The path as the results can hold it: undecodable bytes as ``\\xNN``, cut to
    MAX_SOURCE_BYTES."""
    name = os.fsencode(path).decode("utf-8", "backslashreplace")
    if len(name.encode()) <= MAX_SOURCE_BYTES:
        return name
    return name.encode()[: MAX_SOURCE_BYTES - 3].decode("utf-8", "ignore") + "..."


def _add_dicomdir(
    found: Discovery, path: str, ds: Dataset, queue: deque[str], seen: set[str]
) -> None:
    referenced = referenced_files(ds, Path(path).parent)
    found.rejected.append(
        rejected(path, RejectCode.UNREADABLE, "DICOMDIR media directory, not an image")
    )
    for target in referenced:
        if os.path.realpath(target) not in seen:
            seen.add(os.path.realpath(target))
            queue.append(file_name(target))


def _add_instance(found: Discovery, path: str, ds: Dataset) -> None:
    try:
        header = instance_header(ds)
    except RejectedInput as exc:
        found.rejected.append(_unidentified(path, exc))
        return
    study = found.studies.setdefault(
        header.study_instance_uid, StudyFiles(header.study_instance_uid)
    )
    study.instances[path] = header.sop_instance_uid
    study.accession_number = study.accession_number or header.accession_number


def _unidentified(path: str, missing_uid: RejectedInput) -> InstanceResult:
    """A file without usable UIDs: the gate's own verdict first, so the reason is the
    true one (a broken MR is "not a chest radiograph").

    Rare enough to afford a second, full read: a header-only read cannot tell whether
    there is pixel data.
    """
    try:
        ds = read_dataset(path, pixels=True)
        check_has_pixels(ds)
        check_chest_radiograph(ds)
    except RejectedInput as exc:
        return rejected(path, exc.code, exc.reason)
    return rejected(path, missing_uid.code, missing_uid.reason)


def referenced_files(ds: Dataset, base: Path) -> list[Path]:
    """Existing files referenced by a DICOMDIR's records, all under its folder (as the
    standard has them); missing ones and ones outside that folder are logged, not read."""
    files, missing, outside = [], 0, 0
    for record in ds.get("DirectoryRecordSequence", []):
        parts = record.get("ReferencedFileID")
        if not parts:
            continue
        relative = PurePath(*([parts] if isinstance(parts, str) else list(parts)))
        target = base / relative
        if relative.is_absolute() or ".." in relative.parts:
            outside += 1
        elif _is_file(target):
            files.append(target)
        else:
            missing += 1
    if missing:
        log.warning("a DICOMDIR references %d files that are not there", missing)
    if outside:
        log.warning("a DICOMDIR references %d files outside its folder; not read", outside)
    return files


def _is_file(path: Path) -> bool:
    """Path.is_file, False also where the name cannot exist (too long for the file
    system: the OSError, path and all, became the DICOMDIR's reason)."""
    try:
        return path.is_file()
    except OSError:
        return False
