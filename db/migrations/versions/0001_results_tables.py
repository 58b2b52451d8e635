"""Results tables: predictions and studies.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("series_instance_uid", sa.String(64)),
        sa.Column("study_instance_uid", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason_code", sa.String(32)),
        sa.Column("reason", sa.Text),
        sa.Column("covid_probability", sa.Float),
        sa.Column("predicted_label", sa.String(16)),
        sa.Column("threshold", sa.Float),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("view_position", sa.String(16)),
        sa.Column("modality", sa.String(16)),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("decode_ms", sa.Float),
        sa.Column("inference_ms", sa.Float),
        sa.Column("duplicate_of", sa.String(64)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_predictions"),
        sa.UniqueConstraint(
            "sop_instance_uid",
            "model_version",
            name="uq_predictions_sop_instance_uid_model_version",
        ),
    )
    op.create_index(
        "uq_predictions_source_model_version_no_uid",
        "predictions",
        ["source", "model_version"],
        unique=True,
        sqlite_where=sa.text("sop_instance_uid IS NULL"),
        postgresql_where=sa.text("sop_instance_uid IS NULL"),
    )
    op.create_index("ix_predictions_study_instance_uid", "predictions", ["study_instance_uid"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("patient_ref", sa.String(64)),
        sa.Column("study_date", sa.Date),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("covid_probability", sa.Float),
        sa.Column("predicted_label", sa.String(16)),
        sa.Column("threshold", sa.Float),
        sa.Column("n_instances", sa.Integer, nullable=False),
        sa.Column("n_screened", sa.Integer, nullable=False),
        sa.Column("n_rejected", sa.Integer, nullable=False),
        sa.Column("n_failed", sa.Integer, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("files", sa.JSON),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("id", name="pk_studies"),
        sa.UniqueConstraint(
            "study_instance_uid",
            "model_version",
            name="uq_studies_study_instance_uid_model_version",
        ),
    )
    op.create_index("ix_studies_status", "studies", ["status"])


def downgrade() -> None:
    op.drop_table("studies")
    op.drop_table("predictions")
