"""``cxr-screen ingest``: discover the studies under a folder, record them ``queued``, and
send one message per study (batched for a small ingest)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from config.settings import Settings
from db.repository import (
    files_without_rows,
    final_study_uids,
    queue_studies,
    save_unidentified_files,
)
from db.session import database_files
from worker.discovery import StudyFiles, discover
from worker.model import read_card
from worker.queue.messages import Send, StudyTask, message_paths, root_name, study_messages


@dataclass
class IngestSummary:
    files: int = 0
    studies: int = 0
    queued_studies: int = 0
    queued_files: int = 0
    skipped_studies: int = 0
    rejected_files: int = 0
    uids: list[str] = field(default_factory=list)


@dataclass
class IngestProgress:
    on_file: Callable[[str], None] = lambda path: None
    on_discovered: Callable[[int], None] = lambda n: None
    on_queued: Callable[[str], None] = lambda uid: None


def ingest(
    paths: Sequence[str | Path],
    settings: Settings,
    send: Send,
    *,
    sessions: sessionmaker[Session],
    force: bool = False,
    progress: IngestProgress | None = None,
) -> IngestSummary:
    """Header-only scan, ``queued`` rows, messages of one or a few studies each.

    Safe to repeat: studies with a final result for this model are skipped (unless
    ``force``); a study queued twice is screened twice into the same rows.
    """

    progress = progress or IngestProgress()
    model_version = read_card(settings.model).model_version
    found = discover(paths, progress.on_file, database_files(settings.database_url))
    summary = IngestSummary(files=found.n_files, rejected_files=len(found.rejected))
    summary.studies = len(found.studies)
    progress.on_discovered(len(found.studies))
    for study in found.studies.values():  # IngestError before any row or message
        message_paths(study.files, settings.ingest_root)
    with sessions.begin() as session:
        save_unidentified_files(session, found.rejected, model_version)
        done = set() if force else final_study_uids(session, list(found.studies), model_version)
        grown = keep_new_files(session, {uid: found.studies[uid] for uid in done}, model_version)
        done -= grown
        tasks = [
            _study_task(uid, study, settings, model_version)
            for uid, study in found.studies.items()
            if uid not in done
        ]
        rows = {
            t.study_instance_uid: {
                "study_instance_uid": t.study_instance_uid,
                "accession_number": found.studies[t.study_instance_uid].accession_number,
                "files": sorted(found.studies[t.study_instance_uid].files),
            }
            for t in tasks
        }
        fresh = [row for uid, row in rows.items() if uid not in grown]
        queue_studies(session, fresh, model_version, force=force)
        # a study with files its result has no row for is queued over that result
        queue_studies(session, [rows[uid] for uid in sorted(grown)], model_version, force=True)
    summary.skipped_studies = len(done)
    # Rows first, then messages: a crash in between leaves studies `queued` without a
    # message, and the next ingest (or requeue) sends them.
    tasks = [replace(t, force=force) for t in tasks]
    for message in study_messages(tasks, settings.studies_per_message):
        send(message)
        for study in message.get("studies", [message]):
            summary.queued_studies += 1
            summary.queued_files += len(study["files"])
            summary.uids.append(study["study_instance_uid"])
            progress.on_queued(study["study_instance_uid"])
    return summary


def keep_new_files(
    session: Session, finished: dict[str, StudyFiles], model_version: str
) -> set[str]:
    """The finished studies with files their rows lack (a late film, a new instance at a
    known path, a film unreadable when screened), each cut down to those files: the
    study row sums up the new rows with the earlier ones."""
    lacking = files_without_rows(
        session,
        {path: sop for study in finished.values() for path, sop in study.instances.items()},
        model_version,
    )
    grown = set()
    for uid, study in finished.items():
        # with the files that share an instance with a new one (a copy sent again under
        # another name): screened alone, a copy would take the instance's row from the
        # other file, which would then lack one, and the two be queued in turn for ever
        sops = {study.instances[path] for path in lacking & study.instances.keys()}
        if sops:
            study.instances = {p: sop for p, sop in study.instances.items() if sop in sops}
            grown.add(uid)
    return grown


def _study_task(uid: str, study: StudyFiles, settings: Settings, model_version: str) -> StudyTask:
    files = tuple(message_paths(study.files, settings.ingest_root))
    return StudyTask(uid, files, model_version, root=root_name(settings.ingest_root))
