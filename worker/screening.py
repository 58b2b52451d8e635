"""Screening one study: the plain function shared by ``cxr-screen run`` and the Celery task.

No Celery, no database here: files in, a ``StudyOutcome`` out. Bad input never raises;
it becomes a rejected (or, for an unexpected error, failed) instance result. Celery's
soft time limit is not about the input: it always reaches the caller.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from celery.exceptions import SoftTimeLimitExceeded

from worker.imaging.dicom import (
    InstanceHeader,
    describe_read_error,
    header_or_none,
    read_dataset,
)
from worker.imaging.enum import Label, RejectCode, Status, StudyStatus
from worker.imaging.errors import RejectedInput
from worker.imaging.pipeline import model_input, read_dicom_image
from worker.model import Classifier

log = logging.getLogger(__name__)

DUPLICATE_INSTANCE = "duplicate_instance"

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def keep_image_buffers() -> None:
    """Let the C allocator reuse image-sized buffers instead of returning them each time.

    By default glibc serves every multi-megabyte array (the file bytes, the decoded
    pixels) with a fresh ``mmap`` and unmaps it when freed, so each image pays a few
    thousand page faults again: on a 2,048 x 2,500 uncompressed image that is 8.5 ms of
    kernel time out of 19 ms. Serving blocks up to 32 MB from the heap and trimming
    only above 256 MB keeps those pages mapped and reused: 10 ms per image, about 4 MB
    more resident memory, flat over a long run. Once per process; a no-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024)


@dataclass(frozen=True)
class InstanceResult:
    """The outcome for one file."""

    source: str
    status: Status
    header: InstanceHeader | None = None
    reason_code: str | None = None
    reason: str | None = None
    covid_probability: float | None = None
    predicted_label: Label | None = None
    decode_ms: float | None = None
    inference_ms: float | None = None
    duplicate_of: str | None = None

    @property
    def sop_instance_uid(self) -> str | None:
        return self.header.sop_instance_uid if self.header and not self.duplicate_of else None


@dataclass(frozen=True)
class StudyOutcome:
    """The outcome for one study: its instances and the study-level verdict."""

    study_instance_uid: str
    instances: tuple[InstanceResult, ...]
    model_version: str
    threshold: float | None  # None when nothing was screened (see failed_outcome)
    started_at: dt.datetime
    finished_at: dt.datetime
    header: InstanceHeader | None = field(default=None)

    @property
    def counted(self) -> tuple[InstanceResult, ...]:
        """One result per SOP Instance UID (duplicate copies are not counted)."""
        return tuple(r for r in self.instances if r.duplicate_of is None)

    @property
    def n_screened(self) -> int:
        return sum(r.status is Status.SCREENED for r in self.counted)

    @property
    def n_rejected(self) -> int:
        return sum(r.status is Status.REJECTED for r in self.counted)

    @property
    def n_failed(self) -> int:
        return sum(r.status is Status.FAILED for r in self.counted)

    @property
    def status(self) -> StudyStatus:
        return study_status([r.status for r in self.counted])

    @property
    def covid_probability(self) -> float | None:
        """The highest probability over the study's screened (frontal) images."""
        probabilities = [
            r.covid_probability
            for r in self.counted
            if r.status is Status.SCREENED and r.covid_probability is not None
        ]
        return max(probabilities) if probabilities else None

    @property
    def predicted_label(self) -> Label | None:
        return label_at(self.covid_probability, self.threshold)

    @property
    def reason(self) -> str | None:
        if self.status is StudyStatus.SCREENED:
            return None
        reasons = sorted({r.reason for r in self.counted if r.reason})
        return "; ".join(reasons) or None


def study_status(statuses: Sequence[str]) -> StudyStatus:
    """A study's status from its counted files': screened if any file was, else failed
    if any failed, else rejected."""
    if Status.SCREENED in statuses:
        return StudyStatus.SCREENED
    if Status.FAILED in statuses:
        return StudyStatus.FAILED
    return StudyStatus.REJECTED


def label_at(probability: float | None, threshold: float | None) -> Label | None:
    if probability is None or threshold is None:
        return None
    return Label.COVID if probability >= threshold else Label.NORMAL


def screen_study(
    study_instance_uid: str,
    files: Sequence[str],
    classifier: Classifier,
    *,
    max_pixels: int,
    batch_size: int = 16,
    deadline: float | None = None,
    names: Mapping[str, str] | None = None,
) -> StudyOutcome:
    """Read, normalise and classify every file of one study, in batches.

    ``deadline``: the ``time.monotonic()`` of the caller's soft time limit. ``names``:
    the name each file's row takes, where it is not the path read.
    """
    keep_image_buffers()
    started = dt.datetime.now(dt.UTC)
    results: list[InstanceResult] = []
    pending: list[tuple[InstanceResult, np.ndarray]] = []
    for path in sorted(files):
        check_deadline(deadline)
        result, tensor = _prepare(path, classifier.input_size, max_pixels)
        if _of_another_study(result, study_instance_uid):
            results.append(replaced_by_another_study(path))
            continue
        if tensor is None:
            results.append(result)
            continue
        pending.append((result, tensor))
        if len(pending) >= batch_size:
            results.extend(_classify(pending, classifier))
            pending = []
    results.extend(_classify(pending, classifier))
    check_deadline(deadline)
    return _outcome(
        study_instance_uid,
        _renamed(results, names),
        classifier.model_version,
        classifier.threshold,
        started,
    )


def _of_another_study(result: InstanceResult, study_instance_uid: str) -> bool:
    header = result.header
    return header is not None and header.study_instance_uid not in (None, study_instance_uid)


def replaced_by_another_study(path: str) -> InstanceResult:
    """A file that holds another study's instance now (a PACS export re-using ``IM1``
    after the study was queued): not scored as this study - it took the queued study's
    row with another patient's film and accession number - and no header of its own."""
    return rejected(
        path,
        RejectCode.OTHER_STUDY,
        "the file holds an instance of another study now (replaced since this study was "
        "queued): ingest the export again to screen it as its own study",
    )


def _renamed(
    results: list[InstanceResult], names: Mapping[str, str] | None
) -> list[InstanceResult]:
    if not names:
        return results
    return [replace(r, source=names.get(r.source, r.source)) for r in results]


def _outcome(
    study_instance_uid: str,
    results: list[InstanceResult],
    model_version: str,
    threshold: float | None,
    started: dt.datetime,
) -> StudyOutcome:
    """The study's outcome from its files' results: duplicates marked, the study header
    taken from its first instance that is not a duplicate."""
    results = mark_duplicates(results)
    return StudyOutcome(
        study_instance_uid=study_instance_uid,
        instances=tuple(results),
        model_version=model_version,
        threshold=threshold,
        started_at=started,
        finished_at=dt.datetime.now(dt.UTC),
        header=next((r.header for r in results if r.header and not r.duplicate_of), None),
    )


def failed_outcome(
    study_instance_uid: str,
    files: Sequence[str],
    model_version: str,
    reason: str,
    names: Mapping[str, str] | None = None,
) -> StudyOutcome:
    """A study that gave no outcome (its process died, it was delivered too often, the
    work kept failing): one ``failed`` row per file, so every file still has a row, keyed
    by the instance's header where it can be read."""
    started = dt.datetime.now(dt.UTC)
    results = [
        InstanceResult(
            source=path,
            status=Status.FAILED,
            header=_header_only(path),
            reason_code="error",
            reason=reason,
        )
        for path in sorted(files)
    ]
    return _outcome(study_instance_uid, _renamed(results, names), model_version, None, started)


def _header_only(path: str) -> InstanceHeader | None:
    try:
        return header_or_none(read_dataset(path, pixels=False))
    except Exception as exc:  # unreadable now: the row is keyed by its path
        reraise_time_limit(exc)
        return None


def check_deadline(deadline: float | None) -> None:
    """Celery's soft time limit is a signal that raises wherever the process is, and
    code that tries the next thing on any exception swallows it without a trace
    (pydicom's decoder loop: the next plugin decodes the frame again). Past the
    deadline, no more files are screened."""
    if deadline is not None and time.monotonic() > deadline:
        raise SoftTimeLimitExceeded()


def reraise_time_limit(exc: BaseException) -> None:
    """Raise Celery's soft time limit when it is ``exc`` or in its chain (``from`` or
    "during handling"): the imaging code wraps any decoder error in a rejection, so a
    limit that fires during a decode arrives as one."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if isinstance(error, SoftTimeLimitExceeded):
            raise error
        seen.add(id(error))
        chained = (error.__cause__, error.__context__)
        pending += [e for e in chained if e is not None and id(e) not in seen]


def _prepare(path: str, size: int, max_pixels: int) -> tuple[InstanceResult, np.ndarray | None]:
    start = time.perf_counter()
    try:
        image = read_dicom_image(path, max_pixels)
        tensor = model_input(image.gray, size)
    except RejectedInput as exc:
        reraise_time_limit(exc)
        # A full read that failed (pixel data cut short) may still have a readable header,
        # as discovery found: the row then belongs to its study and instance.
        header = exc.header or _header_only(path)
        uid = header.sop_instance_uid if header else "(no UID)"
        log.info("instance %s rejected: %s", uid, exc.code.value)
        return rejected(path, exc.code, exc.reason, header), None
    except Exception as exc:  # a bug or a decoder crash must not take the study down
        reraise_time_limit(exc)
        log.exception("failed to prepare an instance")
        return InstanceResult(
            source=path,
            status=Status.FAILED,
            header=_header_only(path),
            reason_code="error",
            reason=describe_read_error(exc),
        ), None
    elapsed = (time.perf_counter() - start) * 1000
    return InstanceResult(
        source=path, status=Status.SCREENED, header=image.header, decode_ms=elapsed
    ), tensor


def _classify(
    pending: list[tuple[InstanceResult, np.ndarray]], classifier: Classifier
) -> list[InstanceResult]:
    if not pending:
        return []
    start = time.perf_counter()
    try:
        probabilities = classifier.predict(np.stack([tensor for _, tensor in pending]))
    except Exception as exc:
        reraise_time_limit(exc)
        log.exception("inference failed for a batch of %d images", len(pending))
        return [
            replace(
                result,
                status=Status.FAILED,
                reason_code="error",
                reason=f"inference failed: {type(exc).__name__}: {exc}",
            )
            for result, _ in pending
        ]
    per_image = (time.perf_counter() - start) * 1000 / len(pending)
    return [
        replace(
            result,
            covid_probability=float(p),
            predicted_label=Label.COVID if p >= classifier.threshold else Label.NORMAL,
            inference_ms=per_image,
        )
        for (result, _), p in zip(pending, probabilities, strict=True)
    ]


def rejected(
    path: str, code: RejectCode | str, reason: str, header: InstanceHeader | None = None
) -> InstanceResult:
    return InstanceResult(
        source=path,
        status=Status.REJECTED,
        header=header,
        reason_code=str(code),
        reason=reason,
    )


def mark_duplicates(results: list[InstanceResult]) -> list[InstanceResult]:
    """Several files with one SOP Instance UID: one counts, the others are marked copies.

    The copy that counts is the first screened one (else the first), by path. A copy
    keeps its own outcome, so every file can still be traced.
    """
    primary: dict[str, InstanceResult] = {}
    for result in sorted(results, key=lambda r: (r.status is not Status.SCREENED, r.source)):
        if result.header is not None:
            primary.setdefault(result.header.sop_instance_uid, result)
    marked = []
    for result in results:
        first = primary.get(result.header.sop_instance_uid) if result.header else None
        if first is None or first is result:
            marked.append(result)
            continue
        # Not the other file's path: export folders are often named after the patient.
        note = "same SOP Instance UID as another file of the study; not counted in its result"
        marked.append(
            replace(
                result,
                duplicate_of=result.header.sop_instance_uid if result.header else None,
                reason_code=result.reason_code or DUPLICATE_INSTANCE,
                reason=f"{result.reason}; {note}" if result.reason else note,
            )
        )
    return marked
