"""Errors of the image pipeline."""

from worker.imaging.enum import RejectCode


class RejectedInput(Exception):
    """An input that cannot be screened, for a reason that retrying will not change."""

    def __init__(self, code: RejectCode, reason: str) -> None:
        super().__init__(f"{code.value}: {reason}")
        self.code = code
        self.reason = reason
