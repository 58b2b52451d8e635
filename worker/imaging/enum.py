"""Outcome vocabularies written to the results tables."""

from enum import StrEnum


class Status(StrEnum):
    SCREENED = "screened"
    REJECTED = "rejected"
    FAILED = "failed"


class StudyStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SCREENED = "screened"
    REJECTED = "rejected"
    FAILED = "failed"


class RejectCode(StrEnum):
    """Why an input was not screened (the ``reason_code`` column)."""

    UNREADABLE = "unreadable"  # not DICOM, truncated, no pixel data, decode failed
    NOT_CHEST = "not_chest_radiograph"  # wrong modality, body part or SOP class
    NOT_FRONTAL = "not_frontal"  # a lateral or other non-frontal chest view
    UNSUPPORTED = "unsupported"  # colour, multi-frame, unknown transfer syntax, too large
    OTHER_STUDY = "other_study"  # a queued file that holds another study's instance now


class Label(StrEnum):
    COVID = "covid"
    NORMAL = "normal"
