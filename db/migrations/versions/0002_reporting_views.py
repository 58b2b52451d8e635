"""Reporting views: daily_summary and positive_studies.

Revision ID: 0002

Analysts query these directly (examples in the README); ``cxr-screen report``
reads ``daily_summary`` too, so the command and the SQL give the same figures.

One SQL text serves both dialects; only two expressions differ (the UTC date of a
timestamp, and the seconds between two timestamps). SQLite has no percentile functions,
so the median and the 95th percentile are computed with ``row_number()`` / ``count()``
windows and linear interpolation between the two nearest ranks, which is the definition
of PostgreSQL's ``percentile_cont`` (the tests compare the two on PostgreSQL).

Later migrations that rebuild ``studies`` (SQLite batch mode copies and renames the
table) must drop these views first and recreate them afterwards: SQLite refuses to
rename a table while a view names a table that does not exist, and PostgreSQL refuses
to alter a column a view uses.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FINAL = "('screened', 'rejected', 'failed')"

# The UTC calendar day of a timestamp column, and the seconds between two of them.
# SQLite stores DateTime(timezone=True) as UTC text ('YYYY-MM-DD HH:MM:SS.ffffff').
DAY = {
    "postgresql": "CAST(({column} AT TIME ZONE 'UTC') AS DATE)",
    "sqlite": "date({column})",
}
SECONDS = {
    "postgresql": "EXTRACT(EPOCH FROM ({end} - {start}))",
    "sqlite": "((julianday({end}) - julianday({start})) * 86400.0)",
}

# Day and model version: `received` counts studies by the day they were queued; every
# other column counts them by the day they finished (screened, rejected or failed).
DAILY_SUMMARY = """
CREATE VIEW daily_summary AS
WITH finished AS (
    SELECT {finished_day} AS day,
           model_version,
           status,
           predicted_label,
           CAST({turnaround} AS DOUBLE PRECISION) AS turnaround_s
    FROM studies
    WHERE finished_at IS NOT NULL AND status IN {final}
),
received AS (
    SELECT {queued_day} AS day, model_version, COUNT(*) AS received
    FROM studies
    WHERE COALESCE(queued_at, started_at, finished_at) IS NOT NULL
    GROUP BY {queued_day}, model_version
),
outcomes AS (
    SELECT day,
           model_version,
           SUM(CASE WHEN status = 'screened' THEN 1 ELSE 0 END) AS screened,
           SUM(CASE WHEN status = 'rejected' THEN 1 ELSE 0 END) AS rejected,
           SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,
           SUM(CASE WHEN status = 'screened' AND predicted_label = 'covid'
                    THEN 1 ELSE 0 END) AS positive
    FROM finished
    GROUP BY day, model_version
),
ranked AS (
    SELECT day,
           model_version,
           turnaround_s,
           ROW_NUMBER() OVER (PARTITION BY day, model_version ORDER BY turnaround_s) - 1 AS i,
           COUNT(*) OVER (PARTITION BY day, model_version) AS n
    FROM finished
    WHERE turnaround_s IS NOT NULL
),
turnaround AS (
    -- Ranks i = 0..n-1. Median: mean of ranks (n-1)/2 and n/2 (integer division).
    -- p95: position 0.95 (n-1) = 19 (n-1) / 20, interpolated between its two ranks.
    SELECT day,
           model_version,
           AVG(CASE WHEN i = (n - 1) / 2 OR i = n / 2 THEN turnaround_s END) AS median_s,
           MAX(CASE WHEN i = 19 * (n - 1) / 20 THEN turnaround_s END) AS p95_low,
           MAX(CASE WHEN i = 19 * (n - 1) / 20 + 1 THEN turnaround_s END) AS p95_high,
           MAX(19 * (n - 1) % 20) / 20.0 AS p95_fraction
    FROM ranked
    GROUP BY day, model_version
),
days AS (
    SELECT day, model_version FROM received
    UNION
    SELECT day, model_version FROM outcomes
)
SELECT d.day,
       d.model_version,
       COALESCE(r.received, 0) AS received,
       COALESCE(o.screened, 0) AS screened,
       COALESCE(o.rejected, 0) AS rejected,
       COALESCE(o.failed, 0) AS failed,
       COALESCE(o.positive, 0) AS positive,
       CAST(o.positive AS DOUBLE PRECISION) / NULLIF(o.screened, 0) AS positivity_rate,
       CAST(t.median_s AS DOUBLE PRECISION) AS median_turnaround_s,
       CAST(t.p95_low + t.p95_fraction * (COALESCE(t.p95_high, t.p95_low) - t.p95_low)
            AS DOUBLE PRECISION) AS p95_turnaround_s
FROM days d
LEFT JOIN received r ON r.day = d.day AND r.model_version = d.model_version
LEFT JOIN outcomes o ON o.day = d.day AND o.model_version = d.model_version
LEFT JOIN turnaround t ON t.day = d.day AND t.model_version = d.model_version
"""

POSITIVE_STUDIES = """
CREATE VIEW positive_studies AS
SELECT accession_number,
       study_date,
       covid_probability,
       threshold,
       model_version,
       finished_at,
       study_instance_uid
FROM studies
WHERE status = 'screened' AND predicted_label = 'covid'
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect not in DAY:
        raise NotImplementedError(
            f"reporting views are written for SQLite and PostgreSQL, not {dialect}"
        )
    op.execute(
        DAILY_SUMMARY.format(
            finished_day=DAY[dialect].format(column="finished_at"),
            queued_day=DAY[dialect].format(column="COALESCE(queued_at, started_at, finished_at)"),
            turnaround=SECONDS[dialect].format(end="finished_at", start="queued_at"),
            final=FINAL,
        )
    )
    op.execute(POSITIVE_STUDIES)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS positive_studies")
    op.execute("DROP VIEW IF EXISTS daily_summary")
