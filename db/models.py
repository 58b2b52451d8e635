"""Tables that analysts query. Column names are part of the product: see the README."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


# 64-bit on PostgreSQL (upserts use up sequence values; migration 0005); SQLite keeps
# INTEGER, whose primary key is the 64-bit rowid.
ROW_ID = BigInteger().with_variant(Integer, "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Prediction(Base):
    """One row per input file / DICOM instance per model version."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "model_version"),
        # Files without a SOP Instance UID (not DICOM, unparseable) are keyed by path.
        Index(
            "uq_predictions_source_model_version_no_uid",
            "source",
            "model_version",
            unique=True,
            sqlite_where=text("sop_instance_uid IS NULL"),
            postgresql_where=text("sop_instance_uid IS NULL"),
        ),
        Index("ix_predictions_study_instance_uid", "study_instance_uid"),
        Index("ix_predictions_source_model_version", "source", "model_version"),
        Index("ix_predictions_updated_at", "updated_at"),
    )

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    covid_probability: Mapped[float | None] = mapped_column(Float)
    predicted_label: Mapped[str | None] = mapped_column(String(16))
    threshold: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(Text)
    decode_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    duplicate_of: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Study(Base):
    """One row per study per model version."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("study_instance_uid", "model_version"),
        Index("ix_studies_status_finished_at", "status", "finished_at"),
        Index("ix_studies_finished_at", "finished_at"),
        Index("ix_studies_queued_at", "queued_at"),
    )

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_ref: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    covid_probability: Mapped[float | None] = mapped_column(Float)
    predicted_label: Mapped[str | None] = mapped_column(String(16))
    threshold: Mapped[float | None] = mapped_column(Float)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    n_screened: Mapped[int] = mapped_column(Integer, default=0)
    n_rejected: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[str] = mapped_column(String(64))
    files: Mapped[list[str] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    queued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
