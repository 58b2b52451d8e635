"""Writes to the results tables: upserts on the unique keys, one transaction per study.

Upserts make every write idempotent: a re-run, a re-ingest or a redelivered task
rewrites the same rows instead of adding new ones.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any

from sqlalchemy import String, Table, func, or_, select, text, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from db.models import Prediction, Study, utcnow
from worker.imaging.enum import StudyStatus
from worker.privacy import PatientIdMode, patient_ref
from worker.screening import (
    DUPLICATE_INSTANCE,
    InstanceResult,
    StudyOutcome,
    label_at,
    study_status,
)

PREDICTIONS: Table = Prediction.__table__  # type: ignore[assignment]
STUDIES: Table = Study.__table__  # type: ignore[assignment]
NO_UID = text("sop_instance_uid IS NULL")
OF_ANOTHER_STUDY = "same SOP Instance UID as a file of another study; stored under its path"
SCREENED_SINCE = "same SOP Instance UID as a file of the study screened since; not counted"


def save_study(
    session: Session,
    outcome: StudyOutcome,
    *,
    patient_id_mode: PatientIdMode,
    hash_key: str,
    from_queue: bool = False,
) -> bool:
    """Instance rows and the study row of one screened study, in the caller's transaction.

    A ``screened`` or ``rejected`` study is not replaced by a ``failed`` outcome (a
    duplicate delivery that ran out of memory, say): then nothing is written, and False
    is returned.
    ``from_queue``: ingest's row keeps its ``files`` (ingest's paths, from which
    ``requeue`` makes messages; a worker may see the export under another root) and its
    ``queued_at``. Otherwise (``run``) the study was received when its screening started,
    also when it is screened again: turnaround and day count from then.
    """
    row = _study_row(outcome, patient_id_mode, hash_key)
    insert_values = fit_to_columns(STUDIES, {"queued_at": outcome.started_at, "attempts": 1, **row})
    columns = tuple(k for k in row if k != "files") if from_queue else (*row, "queued_at")
    statement = _study_statement(_dialect(session), columns)
    if session.execute(statement, insert_values).first() is None:
        return False
    save_instances(
        session,
        outcome.instances,
        outcome.model_version,
        outcome.threshold,
        study_instance_uid=outcome.study_instance_uid,
    )
    _delete_replaced_files(session, outcome)
    _sum_up_study(session, outcome, with_files=not from_queue)
    return True


def _delete_replaced_files(session: Session, outcome: StudyOutcome) -> None:
    """Rows of the study whose path now holds another instance (a file replaced in the
    export): the file screened now is the one there. Rows of files this screening did
    not see stay: late images come in another export, and exports are often removed
    once read."""
    instance_at = dict(_keys(outcome))
    rows = session.execute(
        select(PREDICTIONS.c.id, PREDICTIONS.c.sop_instance_uid, PREDICTIONS.c.source).where(
            PREDICTIONS.c.study_instance_uid == _study_key(outcome),
            PREDICTIONS.c.model_version == outcome.model_version,
            PREDICTIONS.c.source.in_(sorted(instance_at)),
        )
    )
    replaced = sorted(
        row.id for row in rows if row.sop_instance_uid not in (None, instance_at[row.source])
    )
    if replaced:
        session.execute(PREDICTIONS.delete().where(PREDICTIONS.c.id.in_(replaced)))


def _sum_up_study(session: Session, outcome: StudyOutcome, *, with_files: bool) -> None:
    """The study row's figures over every file of the study this model has a row for,
    this screening's and earlier ones' (a study screened in parts, as its images came):
    a late normal film must not hide the covid film screened the night before."""
    rows = session.execute(
        select(
            PREDICTIONS.c.source,
            PREDICTIONS.c.sop_instance_uid,
            PREDICTIONS.c.duplicate_of,
            PREDICTIONS.c.status,
            PREDICTIONS.c.covid_probability,
            PREDICTIONS.c.threshold,
            PREDICTIONS.c.reason,
        ).where(
            PREDICTIONS.c.study_instance_uid == _study_key(outcome),
            PREDICTIONS.c.model_version == outcome.model_version,
        )
    ).all()
    counted = _one_per_instance(rows)
    screened = [r for r in counted if r.status == "screened" and r.covid_probability is not None]
    best = max(screened, key=lambda r: r.covid_probability, default=None)
    statuses = [r.status for r in counted]
    status = study_status(statuses)
    # A study with no screened file has no threshold, as its rows; a failed screening of
    # new files has none either: the screened rows' stands.
    threshold = None
    if best is not None:
        threshold = best.threshold if outcome.threshold is None else outcome.threshold
    probability = best.covid_probability if best else None
    figures: dict[str, Any] = {
        "status": status.value,
        "n_instances": len(counted),
        "n_screened": statuses.count("screened"),
        "n_rejected": statuses.count("rejected"),
        "n_failed": statuses.count("failed"),
        "covid_probability": probability,
        "threshold": threshold,
        "predicted_label": _value(label_at(probability, threshold)),
        "reason": None
        if status is StudyStatus.SCREENED
        else "; ".join(sorted({r.reason for r in counted if r.reason})) or None,
    }
    if with_files:
        figures["files"] = sorted(row.source for row in rows)
    session.execute(
        STUDIES.update()
        .where(
            STUDIES.c.study_instance_uid == outcome.study_instance_uid,
            STUDIES.c.model_version == outcome.model_version,
        )
        .values(fit_to_columns(STUDIES, figures))
    )


def _one_per_instance(rows: Sequence[Any]) -> list[Any]:
    """One row per SOP Instance UID (a file and its copies, which carry it in
    duplicate_of), the screened one first, then by path; files without a UID each count."""
    chosen: dict[str, Any] = {}
    for row in sorted(rows, key=lambda r: (r.status != "screened", r.source)):
        chosen.setdefault(row.sop_instance_uid or row.duplicate_of or f"file:{row.source}", row)
    return list(chosen.values())


def _keys(outcome: StudyOutcome) -> list[tuple[str, str | None]]:
    """(source, SOP Instance UID) of each file, as the rows store them."""
    rows = [
        fit_to_columns(PREDICTIONS, {"source": r.source, "sop_instance_uid": r.sop_instance_uid})
        for r in outcome.instances
    ]
    return [(row["source"], row["sop_instance_uid"]) for row in rows]


def _study_key(outcome: StudyOutcome) -> str:
    fitted = fit_to_columns(PREDICTIONS, {"study_instance_uid": outcome.study_instance_uid})
    return str(fitted["study_instance_uid"])


def _study_row(
    outcome: StudyOutcome, patient_id_mode: PatientIdMode, hash_key: str
) -> dict[str, Any]:
    header = outcome.header
    row: dict[str, Any] = {
        "study_instance_uid": outcome.study_instance_uid,
        "model_version": outcome.model_version,
        "status": outcome.status.value,
        "reason": outcome.reason,
        "covid_probability": outcome.covid_probability,
        "predicted_label": _value(outcome.predicted_label),
        "threshold": outcome.threshold,
        "n_instances": len(outcome.counted),
        "n_screened": outcome.n_screened,
        "n_rejected": outcome.n_rejected,
        "n_failed": outcome.n_failed,
        "files": sorted(r.source for r in outcome.instances),
        "started_at": outcome.started_at,
        "finished_at": outcome.finished_at,
    }
    if header is not None:
        row["accession_number"] = header.accession_number
        row["study_date"] = header.study_date
        row["patient_ref"] = patient_ref(header.patient_id, patient_id_mode, hash_key)
    return row


def save_instances(
    session: Session,
    results: Iterable[InstanceResult],
    model_version: str,
    threshold: float | None,
    *,
    study_instance_uid: str | None = None,
) -> None:
    """Upsert instance rows: by SOP Instance UID, or by path where there is none.

    ``study_instance_uid``: the study the files were screened as, which their rows keep
    (also a file whose header is unreadable now, or names another study after a copy
    over it), so that the study's result sums up exactly its own rows.

    A UID's row belongs to the study that wrote it first. Another study's file with the
    same UID (invalid, but re-identified and merged exports do it) is stored as a copy
    keyed by its path, instead of taking that row over and leaving a file without one.
    """
    now = utcnow()
    with_uid: list[dict[str, Any]] = []
    without_uid: list[dict[str, Any]] = []
    for result in results:
        row = _prediction_row(result, model_version, threshold, now)
        row["study_instance_uid"] = study_instance_uid or row["study_instance_uid"]
        (with_uid if row["sop_instance_uid"] else without_uid).append(row)
    # One lock order for every writer: two PostgreSQL transactions taking the same two
    # UIDs in opposite orders deadlocked.
    with_uid.sort(key=lambda row: row["sop_instance_uid"])
    _keep_earlier_paths_as_copies(session, with_uid, model_version)
    with_uid, taken = _upsert_own_uids(session, with_uid)
    without_uid += [_as_copy(row, OF_ANOTHER_STUDY) for row in taken]
    _upsert(session, PREDICTIONS, without_uid, ["source", "model_version"], where=NO_UID)
    # A file keyed the other way before (unreadable then, its UID read now, or the
    # reverse) keeps one row: the one just written.
    _delete_rows_of(session, with_uid, model_version, PREDICTIONS.c.sop_instance_uid.is_(None))
    _delete_rows_of(
        session, without_uid, model_version, PREDICTIONS.c.sop_instance_uid.is_not(None)
    )


def _keep_earlier_paths_as_copies(
    session: Session, rows: list[dict[str, Any]], model_version: str
) -> None:
    """A file of the same study that held a UID's row at another path, not screened now,
    keeps a row: as a copy keyed by its path, with its own outcome. The UID's row moves
    to the file screened now, and the other file (a folder of copies screened on its own,
    or a second delivery of part of a study) is not left without a row."""
    if not rows:
        return
    now_at = {row["sop_instance_uid"]: row for row in rows}
    sources = {row["source"] for row in rows}
    copies = []
    for uids in _chunks(sorted(now_at)):
        held = session.execute(
            select(PREDICTIONS).where(
                PREDICTIONS.c.sop_instance_uid.in_(uids),
                PREDICTIONS.c.model_version == model_version,
            )
        ).mappings()
        for old in held:
            study = now_at[old["sop_instance_uid"]]["study_instance_uid"]
            if old["source"] not in sources and old["study_instance_uid"] == study:
                copies.append(_as_copy(dict(old), SCREENED_SINCE))
    _upsert(session, PREDICTIONS, copies, ["source", "model_version"], where=NO_UID)


def _upsert_own_uids(
    session: Session, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Upsert UID-keyed rows whose UID is new or already their study's. Returns the rows
    written and those not written, whose UID another study holds."""
    if not rows:
        return [], []
    statement = _own_uid_statement(_dialect(session), tuple(rows[0]))
    rows = [fit_to_columns(PREDICTIONS, row) for row in rows]
    written = set(session.scalars(statement, rows[0] if len(rows) == 1 else rows))
    return (
        [row for row in rows if row["sop_instance_uid"] in written],
        [row for row in rows if row["sop_instance_uid"] not in written],
    )


def _as_copy(row: dict[str, Any], note: str) -> dict[str, Any]:
    """The row keyed by its path, as a copy of its SOP Instance UID."""
    return {
        **{k: v for k, v in row.items() if k != "id"},
        "sop_instance_uid": None,
        "duplicate_of": row["sop_instance_uid"],
        "reason_code": row["reason_code"] or DUPLICATE_INSTANCE,
        "reason": f"{row['reason']}; {note}" if row["reason"] else note,
    }


def _delete_rows_of(
    session: Session, rows: list[dict[str, Any]], model_version: str, keyed: Any
) -> None:
    """Rows of the same files keyed the other way, but not another study's: a path that
    held one study's film and now another's has a row in each (the later study's
    screening deleted the earlier one's row)."""
    by_study: dict[str | None, set[str]] = defaultdict(set)
    for row in rows:
        by_study[row["study_instance_uid"]].add(row["source"])
    for study, sources in by_study.items():
        same_study = PREDICTIONS.c.study_instance_uid
        scope = true() if study is None else or_(same_study.is_(None), same_study == study)
        for chunk in _chunks(sorted(sources)):
            session.execute(
                PREDICTIONS.delete().where(
                    keyed,
                    scope,
                    PREDICTIONS.c.model_version == model_version,
                    PREDICTIONS.c.source.in_(chunk),
                )
            )


def _chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """IN lists of at most ``size`` values (SQLite caps a statement's parameters)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def study_status_counts(session: Session) -> dict[str, int]:
    query = select(Study.status, func.count()).group_by(Study.status)
    return {status: count for status, count in session.execute(query).all()}


def _prediction_row(
    result: InstanceResult, model_version: str, threshold: float | None, now: dt.datetime
) -> dict[str, Any]:
    header = result.header
    return {
        "sop_instance_uid": result.sop_instance_uid,
        "series_instance_uid": header.series_instance_uid if header else None,
        "study_instance_uid": header.study_instance_uid if header else None,
        "status": result.status.value,
        "reason_code": result.reason_code,
        "reason": result.reason,
        "covid_probability": result.covid_probability,
        "predicted_label": _value(result.predicted_label),
        "threshold": threshold if result.covid_probability is not None else None,
        "model_version": model_version,
        "view_position": header.view_position if header else None,
        "modality": header.modality if header else None,
        "source": result.source,
        "decode_ms": result.decode_ms,
        "inference_ms": result.inference_ms,
        "duplicate_of": result.duplicate_of,
        "created_at": now,
        "updated_at": now,
    }


def _upsert(
    session: Session,
    table: Table,
    rows: list[dict[str, Any]],
    keys: list[str],
    *,
    where: Any = None,
    update_keys: Sequence[str] | None = None,
    only_if_not_final: bool = False,
) -> None:
    if not rows:
        return
    skip = {*keys, "id", "created_at"}
    columns = tuple(update_keys or [c for c in rows[0] if c not in skip])
    statement = _upsert_statement(
        _dialect(session), table, tuple(keys), columns, where, only_if_not_final
    )
    rows = [fit_to_columns(table, row) for row in rows]
    # Rows of one statement must share their keys; group by column set.
    for group in _by_columns(rows):
        session.execute(statement, group[0] if len(group) == 1 else group)


# PostgreSQL refuses NUL in text; no C0 control character belongs in header text.
_CONTROLS = dict.fromkeys(range(0x20))


def fit_to_columns(table: Table, row: dict[str, Any]) -> dict[str, Any]:
    """Strings as both databases can store them alike: NUL taken out of every one, and
    header text (the columns of a set width) without any C0 control character, cut to
    its column's width. Exports break the VR limits (a 70-character AccessionNumber,
    ViewPosition "AP ERECT PORTABLE", a NUL inside a value); SQLite stores them whole
    but PostgreSQL refuses the statement, which took the whole ingest or study down.
    Free text keeps its tabs and line breaks, and a path (``source``) its characters."""
    widths = _string_widths(table)
    return {
        key: _fit(value, widths.get(key)) if isinstance(value, str) else value
        for key, value in row.items()
    }


def _fit(value: str, width: int | None) -> str:
    if width is None:
        return value.replace("\x00", "")
    return value.translate(_CONTROLS)[:width]


@functools.cache
def _string_widths(table: Table) -> dict[str, int]:
    return {
        column.name: column.type.length
        for column in table.columns
        if isinstance(column.type, String) and column.type.length
    }


def _new_study(
    study_instance_uid: str,
    model_version: str,
    status: StudyStatus,
    now: dt.datetime,
    files: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The columns of a study row that nothing has screened yet."""
    return {
        "study_instance_uid": study_instance_uid,
        "model_version": model_version,
        "status": status.value,
        "files": list(files) if files is not None else None,
        "n_instances": len(files or ()),
        "n_screened": 0,
        "n_rejected": 0,
        "n_failed": 0,
        "attempts": 0,
        "queued_at": now,
    }


def _dialect(session: Session) -> str:
    return str(session.get_bind().dialect.name)


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


# Statements are built once and reused: building one costs ~0.2 ms, a reused one hits
# SQLAlchemy's compiled cache at once (its cache key is memoised on the object).
@functools.cache
def _upsert_statement(
    dialect: str,
    table: Table,
    keys: tuple[str, ...],
    columns: tuple[str, ...],
    where: Any,
    only_if_not_final: bool,
) -> Any:
    statement = _insert(dialect)(table)
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        index_where=where,
        set_={column: excluded[column] for column in columns},
        where=_not_final(table) if only_if_not_final else None,
    )


@functools.cache
def _own_uid_statement(dialect: str, columns: tuple[str, ...]) -> Any:
    statement = _insert(dialect)(PREDICTIONS)
    excluded = statement.excluded
    keys = ("sop_instance_uid", "model_version")
    return statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={c: excluded[c] for c in columns if c not in {*keys, "id", "created_at"}},
        where=PREDICTIONS.c.study_instance_uid.is_not_distinct_from(excluded.study_instance_uid),
    ).returning(PREDICTIONS.c.sop_instance_uid)


@functools.cache
def _study_statement(dialect: str, columns: tuple[str, ...]) -> Any:
    """The study row's upsert, returning the row unless it kept a final (screened or
    rejected) result against a failed one."""
    statement = _insert(dialect)(STUDIES)
    excluded = statement.excluded
    downgrade = ~_not_final(STUDIES) & (excluded.status == StudyStatus.FAILED.value)
    return statement.on_conflict_do_update(
        index_elements=["study_instance_uid", "model_version"],
        set_={column: excluded[column] for column in columns},
        where=~downgrade,
    ).returning(STUDIES.c.id)


@functools.cache
def _marker_statement(dialect: str, take: Take) -> Any:
    statement = _insert(dialect)(STUDIES)
    excluded = statement.excluded
    unfinished = _not_final(STUDIES)
    since_forced = STUDIES.c.finished_at.is_(None) | (STUDIES.c.finished_at < STUDIES.c.queued_at)
    where = {
        Take.UNFINISHED: unfinished,
        Take.FORCED: unfinished | since_forced,
        Take.ANY: None,
    }[take]
    # A final study taken for files it lacks starts a new delivery count: the old one
    # would have its batch split, as if it had been delivered before.
    attempts = 1 if take is Take.ANY else func.coalesce(STUDIES.c.attempts, 0) + 1
    return statement.on_conflict_do_update(
        index_elements=["study_instance_uid", "model_version"],
        set_={"status": excluded.status, "started_at": excluded.started_at, "attempts": attempts},
        where=where,
    ).returning(STUDIES.c.study_instance_uid, STUDIES.c.attempts)


def _not_final(table: Table) -> Any:
    # Plain comparisons, not NOT IN: an expanding IN cannot run as executemany.
    return (table.c.status != StudyStatus.SCREENED.value) & (
        table.c.status != StudyStatus.REJECTED.value
    )


def _by_columns(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


def _value(label: Any) -> str | None:
    return None if label is None else str(label.value)


# --- The distributed pipeline (ingest, worker tasks, status, requeue) -------------------

FINAL_STATUSES = (StudyStatus.SCREENED.value, StudyStatus.REJECTED.value)


def final_study_uids(session: Session, uids: Sequence[str], model_version: str) -> set[str]:
    """The studies among ``uids`` that already have a final result for this model."""
    found: set[str] = set()
    for chunk in _chunks(list(uids)):
        query = select(Study.study_instance_uid).where(
            Study.study_instance_uid.in_(chunk),
            Study.model_version == model_version,
            Study.status.in_(FINAL_STATUSES),
        )
        found.update(session.scalars(query))
    return found


def files_without_rows(
    session: Session, files: Mapping[str, str | None], model_version: str
) -> set[str]:
    """The files (named as rows name them) that have no row for this model holding the
    given SOP Instance UID (None: any row) and a result: new since their study was
    screened, replaced in place, unreadable when the worker read them, or failed."""
    found: dict[str, set[str | None]] = {}
    for sources in _chunks(sorted(files)):
        query = select(
            PREDICTIONS.c.source, PREDICTIONS.c.sop_instance_uid, PREDICTIONS.c.duplicate_of
        ).where(
            PREDICTIONS.c.source.in_(sources),
            PREDICTIONS.c.model_version == model_version,
            PREDICTIONS.c.status != "failed",  # no result: the file is tried again
        )
        for source, uid, copy_of in session.execute(query):
            found.setdefault(source, set()).update({uid or copy_of, None})
    return {source for source, uid in files.items() if uid not in found.get(source, set())}


def sources_in_studies(session: Session, sources: Sequence[str], model_version: str) -> set[str]:
    """The files among these that have a row in a study for this model: the instance's
    row, keyed by its SOP Instance UID, or a copy's, keyed by its path."""
    found: set[str] = set()
    for chunk in _chunks(sources):
        query = select(PREDICTIONS.c.source).where(
            PREDICTIONS.c.source.in_(chunk),
            PREDICTIONS.c.model_version == model_version,
            PREDICTIONS.c.study_instance_uid.is_not(None),
        )
        found.update(session.scalars(query))
    return found


def save_unidentified_files(
    session: Session, rejected: Sequence[InstanceResult], model_version: str
) -> None:
    """Rows for the files discovery could not identify, except over a file's row in a study.
    A file caught mid-copy by a nightly ingest or run would otherwise lose its result
    for good (its study, final, is not queued again), and the study's row would go on
    counting a film with no row behind it."""
    known = sources_in_studies(session, [r.source for r in rejected], model_version)
    save_instances(session, [r for r in rejected if r.source not in known], model_version, None)


def queue_studies(
    session: Session,
    studies: Sequence[dict[str, Any]],
    model_version: str,
    *,
    force: bool = False,
) -> None:
    """Record studies as queued (a fresh delivery count), for ingest and requeue.

    ``attempts`` starts again (so a requeued study is not taken for a poison message);
    final studies are left alone unless ``force``.
    """
    now = utcnow()
    rows = [
        {
            **_new_study(
                study["study_instance_uid"], model_version, StudyStatus.QUEUED, now, study["files"]
            ),
            "reason": None,
            **study,
        }
        # One lock order for every writer, as in save_instances: two ingests of the same
        # folders given in opposite orders deadlocked, and one ended with a traceback.
        for study in sorted(studies, key=lambda study: study["study_instance_uid"])
    ]
    _upsert(
        session,
        STUDIES,
        rows,
        ["study_instance_uid", "model_version"],
        update_keys=("files", "queued_at", "status", "attempts", "reason"),
        only_if_not_final=not force,
    )


class Take(StrEnum):
    """Which studies a worker's marker takes."""

    UNFINISHED = "unfinished"  # no final result yet
    # also one whose result is older than the ``ingest --force`` that queued it: the
    # message's second delivery then finds the forced screening done
    FORCED = "forced"
    ANY = "any"  # also a final one: its result misses files of the message


def mark_processing(
    session: Session,
    study_instance_uid: str,
    model_version: str,
    files: Sequence[str],
    *,
    take: Take = Take.UNFINISHED,
) -> int | None:
    """A worker takes a study: ``processing``, ``started_at`` now, ``attempts`` + 1.

    Returns the new attempt count, or None when the study has a final result that
    ``take`` leaves alone: then the caller skips the study.
    """
    taken = mark_processing_many(session, {study_instance_uid: files}, model_version, take=take)
    return taken.get(study_instance_uid)


def mark_processing_many(
    session: Session,
    files_by_study: Mapping[str, Sequence[str]],
    model_version: str,
    *,
    take: Take = Take.UNFINISHED,
) -> dict[str, int]:
    """``mark_processing`` for several studies; the attempt count of each one taken.

    Studies with a final result are missing from the answer. One statement (an upsert
    returning the counts), so the markers cost one round trip and concurrent deliveries
    of the same study serialise on its row.
    """
    now = utcnow()
    rows = [
        {
            **_new_study(uid, model_version, StudyStatus.PROCESSING, now, files),
            "attempts": 1,
            "started_at": now,
        }
        for uid, files in sorted(files_by_study.items())  # the lock order of queue_studies
    ]
    statement = _marker_statement(_dialect(session), take)
    result = session.execute(statement, rows[0] if len(rows) == 1 else rows)
    return {uid: attempts for uid, attempts in result}


# A study recorded failed without an outcome has no result: an earlier screening's (an
# `ingest --force` of a covid study, then a failure) kept its label in the positive list.
NO_RESULT = {
    "covid_probability": None,
    "predicted_label": None,
    "threshold": None,
    "n_screened": 0,
    "n_rejected": 0,
}


def mark_failed(
    session: Session,
    study_instance_uid: str,
    model_version: str,
    reason: str,
) -> None:
    """Record a study as ``failed`` with the last error, unless it already has a result."""
    now = utcnow()
    row = {
        **_new_study(study_instance_uid, model_version, StudyStatus.FAILED, now),
        **NO_RESULT,
        "reason": reason[:2000],
        "finished_at": now,
    }
    _upsert(
        session,
        STUDIES,
        [row],
        ["study_instance_uid", "model_version"],
        update_keys=("status", "reason", "finished_at", *NO_RESULT),
        only_if_not_final=True,
    )


def fail_unfinished(
    session: Session, uids: Sequence[str], model_version: str, reason: str
) -> list[str]:
    """Record existing studies without a final result as ``failed``; creates no row.
    The UIDs of the studies so recorded."""
    result = session.execute(
        STUDIES.update()
        .where(
            STUDIES.c.study_instance_uid.in_(uids),
            STUDIES.c.model_version == model_version,
            STUDIES.c.status.not_in(FINAL_STATUSES),
        )
        .values(
            fit_to_columns(
                STUDIES,
                {
                    "status": StudyStatus.FAILED.value,
                    **NO_RESULT,
                    "reason": reason[:2000],
                    "finished_at": utcnow(),
                },
            )
        )
        .returning(STUDIES.c.study_instance_uid)
    )
    return sorted(result.scalars())


def failed_studies(session: Session, model_version: str | None = None) -> list[Study]:
    """Studies recorded ``failed``, and those screened or rejected with files that failed
    (new films whose screening failed after the study's first result), oldest first; not
    a study queued or taken since (its counts are the last result's until it finishes)."""
    query = select(Study).where(
        (Study.status == StudyStatus.FAILED.value)
        | (Study.status.in_(FINAL_STATUSES) & (Study.n_failed > 0))
    )
    if model_version is not None:
        query = query.where(Study.model_version == model_version)
    return list(session.scalars(query.order_by(Study.finished_at, Study.id)))


TAKEN_AT = func.coalesce(Study.started_at, Study.queued_at)  # when a worker took the study


def stale_studies(session: Session, model_version: str, before: dt.datetime) -> list[Study]:
    """Studies ``queued`` since before ``before``, or taken (``processing``) before it."""
    query = select(Study).where(
        Study.model_version == model_version,
        ((Study.status == StudyStatus.QUEUED.value) & (Study.queued_at < before))
        | ((Study.status == StudyStatus.PROCESSING.value) & (before > TAKEN_AT)),
    )
    return list(session.scalars(query.order_by(Study.queued_at, Study.id)))


def lost_to_other_models(session: Session, model_version: str, before: dt.datetime) -> list[Study]:
    """Studies another model version took (``processing``) before ``before`` and never
    finished, which this version has a row of too: a worker running that model took the
    study queued for this one and was lost. In UID order, the writers' lock order."""
    ours = aliased(Study)
    this_version_too = (
        select(ours.id)
        .where(
            ours.study_instance_uid == Study.study_instance_uid,
            ours.model_version == model_version,
        )
        .exists()
    )
    query = select(Study).where(
        Study.model_version != model_version,
        Study.status == StudyStatus.PROCESSING.value,
        before > TAKEN_AT,
        this_version_too,
    )
    return list(session.scalars(query.order_by(Study.study_instance_uid, Study.model_version)))


def oldest_queued_at(session: Session) -> dt.datetime | None:
    query = select(func.min(Study.queued_at)).where(Study.status == StudyStatus.QUEUED.value)
    value = session.execute(query).scalar_one_or_none()
    if value is not None and value.tzinfo is None:  # SQLite drops the zone; stored as UTC
        value = value.replace(tzinfo=dt.UTC)
    return value
