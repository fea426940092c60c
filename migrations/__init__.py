"""Alembic migrations for every qai table (SQLite and PostgreSQL)."""
