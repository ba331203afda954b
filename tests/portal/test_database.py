"""The suite runs on PostgreSQL in CI (SQLite is only the quick local path)."""

from __future__ import annotations

import os

from django.db import connection


def test_ci_runs_on_postgresql(db):
    """Under CI the engine must be PostgreSQL whatever DATABASE_URL says; elsewhere it is the one
    DATABASE_URL names. Asked of the server itself, not of Django's label for the backend."""
    url = os.environ.get("DATABASE_URL", "")
    wants_postgres = bool(os.environ.get("CI")) or url.startswith(("postgres://", "postgresql://"))
    with connection.cursor() as cursor:
        if wants_postgres:
            assert connection.vendor == "postgresql", (
                f"the test database is {connection.vendor}; make test exports DATABASE_URL"
            )
            cursor.execute("SELECT version()")
            assert cursor.fetchone()[0].startswith("PostgreSQL ")
        else:
            assert connection.vendor == "sqlite"
            cursor.execute("SELECT sqlite_version()")
            assert cursor.fetchone()[0].count(".") == 2


def test_database_url_selects_the_engine(db):
    url = os.environ.get("DATABASE_URL", "")
    expected = "postgresql" if url.startswith(("postgres://", "postgresql://")) else "sqlite"
    assert connection.vendor == expected
