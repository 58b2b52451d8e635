"""The results database: SQLAlchemy models, Alembic migrations and the writes."""
