"""Index the timestamps that reports, exports and the example queries filter a period by.

Revision ID: 0004

`report` and `export` select studies by finished_at and files by updated_at; the
turnaround and daily figures read queued_at. Without these, each scanned the whole
table (500,000 studies: a parallel sequential scan on PostgreSQL).
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_studies_finished_at": ("studies", "finished_at"),
    "ix_studies_queued_at": ("studies", "queued_at"),
    "ix_predictions_updated_at": ("predictions", "updated_at"),
}


def upgrade() -> None:
    for name, (table, column) in INDEXES.items():
        op.create_index(name, table, [column])


def downgrade() -> None:
    for name, (table, _) in INDEXES.items():
        op.drop_index(name, table_name=table)
