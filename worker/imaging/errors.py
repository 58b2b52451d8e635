"""Errors of the image pipeline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.imaging.enum import RejectCode

if TYPE_CHECKING:
    from worker.imaging.dicom import InstanceHeader


class RejectedInput(Exception):
    """An input that cannot be screened, for a reason that retrying will not change.

    ``header`` is set when the file parsed far enough to identify the instance, so the
    rejection can be recorded against its SOP Instance UID.
    """

    def __init__(self, code: RejectCode, reason: str, header: InstanceHeader | None = None) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason
        self.header = header
