"""Logging setup: plain or JSON lines. Messages carry UIDs and codes, never patient data."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

from sqlalchemy.exc import StatementError

from worker.privacy import file_error


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("study_instance_uid", "status", "task_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class NoMessageBodies(logging.Filter):
    """Celery and kombu log the whole body and headers of a message they cannot take (an
    unregistered task, a refused pickle): the file paths, which often name the patient."""

    MARKERS = ("The full contents of the message body", "Can't decode message body")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for marker in self.MARKERS:
            at = message.find(marker)
            if at >= 0:
                record.msg = f"{message[:at]}{marker}: not logged (file paths may name patients)"
                record.args = ()
                break
        return True


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(NoMessageBodies())
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("alembic", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom logs every failed decoder plugin with a traceback; the gate reports the
    # outcome itself, as a rejection with a reason.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    # At DEBUG Celery's pool logs every message's arguments: the file paths, whose folder
    # and file names often carry the patient's name and ID.
    logging.getLogger("celery.pool").setLevel(max(logging.INFO, root.level))


def describe_error(exc: BaseException) -> str:
    """``Type: message`` for logs and ``studies.reason``.

    For a database error, only the first line of the driver's message: the rest of the
    text names the statement's parameters, and PostgreSQL's DETAIL line can quote the
    whole row (accession number, patient reference, file paths). A file error without
    its file names: export folders are often named after the patient.
    """
    if isinstance(exc, StatementError) and exc.orig is not None:
        lines = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
        return f"{type(exc).__name__}: {lines[0]}"[:1000]
    if isinstance(exc, OSError) and exc.filename is not None:
        return file_error(exc)
    return f"{type(exc).__name__}: {exc}".strip()[:1000]
