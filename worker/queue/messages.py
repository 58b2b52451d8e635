"""Task messages: what ``ingest`` and ``requeue`` send and a worker accepts, and the
file paths they carry (relative to an ingest root the worker may mount elsewhere)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from worker.discovery import file_name
from worker.imaging.dicom import is_dicom_uid
from worker.queue.errors import IngestError, MalformedTask

MESSAGE_KEYS = frozenset({"study_instance_uid", "files", "model_version", "force", "root"})
BATCH_KEYS = frozenset({"studies", "model_version", "force", "root"})
BATCH_STUDY_KEYS = frozenset({"study_instance_uid", "files"})
# A small ingest is batched into about this many messages (9 to 16), so that it still
# spreads over every worker process.
MIN_MESSAGES = 16

Send = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StudyTask:
    """What a worker needs to find a study's files; never pixel data."""

    study_instance_uid: str
    files: tuple[str, ...]
    model_version: str
    force: bool = False
    root: str | None = None  # the ingest root as ingest names it; ``files`` are under it

    def message(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "files": list(self.files),
            "model_version": self.model_version,
        }
        if self.force:
            body["force"] = True
        if self.root is not None:
            body["root"] = self.root
        return body


def message_body(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A task's fields: its keyword arguments, or one positional JSON object."""
    if not args:
        return kwargs
    return args[0] if len(args) == 1 and isinstance(args[0], dict) and not kwargs else None


def parse_message(args: Sequence[Any], kwargs: dict[str, Any]) -> StudyTask:
    """Validate a task's arguments (a JSON object of keyword arguments)."""
    body = message_body(args, kwargs)
    if body is None:
        raise MalformedTask(f"expected keyword arguments only, got {len(args)} positional")
    kwargs = body
    unknown = set(kwargs) - MESSAGE_KEYS
    if unknown:
        raise MalformedTask(f"unknown fields {sorted(unknown)}")
    # The reasons name fields and positions, never values: a malformed UID field can
    # hold a patient's name, and export paths often do.
    uid = kwargs.get("study_instance_uid")
    if not is_dicom_uid(uid):
        raise MalformedTask(
            "study_instance_uid is not a DICOM UID (digits and dots, at most 64 characters)"
        )
    files = kwargs.get("files")
    if not isinstance(files, list) or not files:
        raise MalformedTask("files must be a non-empty list of paths")
    for index, path in enumerate(files):
        if not isinstance(path, str) or not path or "\x00" in path:
            raise MalformedTask(f"files[{index}] is not a file path")
        if not Path(path).is_absolute() and ".." in PurePosixPath(path).parts:
            raise MalformedTask(f"path escapes the ingest root (files[{index}])")
    # A file named twice ("a/x.dcm", "a/./x.dcm") would be screened twice, and the two
    # results' clean-ups deleted each other's row.
    files = list(dict.fromkeys(str(PurePosixPath(path)) for path in files))
    version = kwargs.get("model_version")
    if not isinstance(version, str) or not version:
        raise MalformedTask("model_version must be a non-empty string")
    force = kwargs.get("force", False)
    if not isinstance(force, bool):
        raise MalformedTask("force must be true or false")
    root = kwargs.get("root")
    if root is not None and not is_absolute_path(root):
        raise MalformedTask("root must be an absolute path")
    return StudyTask(uid, tuple(files), version, force, root)


def is_absolute_path(value: Any) -> bool:
    return isinstance(value, str) and "\x00" not in value and PurePosixPath(value).is_absolute()


@dataclass(frozen=True)
class StudyBatch:
    """Several studies in one message: the broker and bookkeeping cost is paid once."""

    studies: tuple[StudyTask, ...]

    def message(self) -> dict[str, Any]:
        shared = self.studies[0].message()
        studies = [
            {"study_instance_uid": t.study_instance_uid, "files": list(t.files)}
            for t in self.studies
        ]
        return {"studies": studies, **{k: v for k, v in shared.items() if k in BATCH_KEYS}}


def parse_batch_message(args: Sequence[Any], kwargs: dict[str, Any]) -> StudyBatch:
    """Validate a batch message: ``{studies: [{study_instance_uid, files}], model_version}``."""
    if args:
        raise MalformedTask(f"expected keyword arguments only, got {len(args)} positional")
    unknown = set(kwargs) - BATCH_KEYS
    if unknown:
        raise MalformedTask(f"unknown fields {sorted(unknown)}")
    studies = kwargs.get("studies")
    if not isinstance(studies, list) or not studies:
        raise MalformedTask("studies must be a non-empty list")
    shared: dict[str, Any] = {k: kwargs[k] for k in BATCH_KEYS - {"studies"} if k in kwargs}
    tasks = []
    for index, study in enumerate(studies):
        # Positions and field names, never values: export paths often hold patient names.
        if not isinstance(study, dict):
            raise MalformedTask(f"studies[{index}] must be {{study_instance_uid, files}}")
        unknown = set(study) - BATCH_STUDY_KEYS
        if unknown:
            raise MalformedTask(f"studies[{index}] has unknown fields {sorted(unknown)}")
        try:
            tasks.append(parse_message((), {**study, **shared}))
        except MalformedTask as exc:
            raise MalformedTask(f"studies[{index}]: {exc}") from None
    if len({t.study_instance_uid for t in tasks}) != len(tasks):
        raise MalformedTask("a study appears twice in one message")
    return StudyBatch(tuple(tasks))


def study_messages(tasks: Sequence[StudyTask], per_message: int) -> list[dict[str, Any]]:
    """Messages for ``tasks``: up to ``per_message`` studies each, and fewer in a small
    ingest, ``ceil(n / MIN_MESSAGES)`` each (one per study up to ``MIN_MESSAGES``
    studies, then 9 to 16 messages), so that it still spreads over the workers."""
    size = max(1, min(per_message, math.ceil(len(tasks) / MIN_MESSAGES)))
    chunks = [tasks[i : i + size] for i in range(0, len(tasks), size)]
    return [c[0].message() if len(c) == 1 else StudyBatch(tuple(c)).message() for c in chunks]


def message_paths(files: Iterable[str], ingest_root: Path | None) -> list[str]:
    """Paths as carried in messages: relative to the ingest root when one is set."""
    if ingest_root is None:
        return [file_name(f) for f in files]
    root = Path(file_name(ingest_root))
    out = []
    for path in files:
        try:
            out.append(Path(file_name(path)).relative_to(root).as_posix())
        except ValueError:
            raise IngestError(
                # not the file's own path: export folders are often named after the patient
                f"files to ingest must be under the ingest root {root} (CXR_INGEST_ROOT); "
                "give the export folder under it"
            ) from None
    return out


def worker_paths(files: Iterable[str], ingest_root: Path | None) -> list[str]:
    """The message's paths on this worker (the ingest root may be mounted elsewhere)."""
    if ingest_root is None:
        return [str(Path(f)) for f in files]
    root = Path(file_name(ingest_root))
    return [str(root / f) if not Path(f).is_absolute() else f for f in files]


def root_name(ingest_root: Path | None) -> str | None:
    """The ingest root as messages carry it: the name rows give the files under it."""
    return None if ingest_root is None else file_name(ingest_root)


def worker_files(task: StudyTask, ingest_root: Path | None) -> dict[str, str]:
    """Each of the task's files as this worker reads it, and the name its row takes: the
    path as ingest named it (the message's root and relative path). Rows, keyed by path
    where a file has no readable UID, then do not depend on where a worker mounts the
    export: two workers mounting it differently write one row. A worker with no ingest
    root of its own reads the files under the message's (it read a relative path from
    its current folder: whatever film sat there was stored as the queued study's)."""
    if ingest_root is None and task.root is not None:
        ingest_root = Path(task.root)
    paths = worker_paths(task.files, ingest_root)
    if task.root is None:
        return {path: path for path in paths}
    return {
        path: path if PurePosixPath(name).is_absolute() else str(PurePosixPath(task.root, name))
        for path, name in zip(paths, task.files, strict=True)
    }


def named_studies(body: dict[str, Any]) -> list[str]:
    """The study UIDs a message names, however malformed (at most the column's size)."""
    studies = body.get("studies", [body])
    entries = studies if isinstance(studies, list) else []
    named = [entry.get("study_instance_uid") for entry in entries if isinstance(entry, dict)]
    return [uid for uid in named if isinstance(uid, str) and 0 < len(uid) <= 64]
