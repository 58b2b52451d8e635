"""64-bit row ids on PostgreSQL.

Revision ID: 0005

An upsert takes a value from the id sequence also when it only updates a row (ON
CONFLICT DO UPDATE draws nextval first): a study screened through a worker takes three
(queued, processing, result), and hourly re-runs over a 500,000-file export would run a
32-bit sequence out in about six months, after which every save fails. SQLite's INTEGER
PRIMARY KEY is 64-bit already. The columns are rewritten under a table lock: seconds
for a million rows.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("predictions", "studies")


def upgrade() -> None:
    _set_id_type(sa.BigInteger(), sa.Integer(), "bigint")


def downgrade() -> None:
    _set_id_type(sa.Integer(), sa.BigInteger(), "integer")


def _set_id_type(new: sa.types.TypeEngine, old: sa.types.TypeEngine, sql_name: str) -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table in TABLES:
        op.alter_column(table, "id", type_=new, existing_type=old, existing_nullable=False)
        op.execute(f"ALTER SEQUENCE {table}_id_seq AS {sql_name}")
