"""Index predictions by (source, model_version).

Revision ID: 0003

Saving a study deletes the rows its files had under the other key (keyed by path while
unreadable, by SOP Instance UID once readable, or the reverse). The unique index on
source covers only rows without a UID; finding UID-keyed rows by source scanned the
table, once per saved study with an unreadable file.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_predictions_source_model_version", "predictions", ["source", "model_version"]
    )


def downgrade() -> None:
    op.drop_index("ix_predictions_source_model_version", table_name="predictions")
