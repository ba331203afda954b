"""The suite runs on PostgreSQL in CI (SQLite is only the quick local path)."""

from __future__ import annotations

import os

from django.db import connection


def test_ci_runs_on_postgresql(db):
    if os.environ.get("CI"):
        assert connection.vendor == "postgresql", (
            f"CI is set but the test database is {connection.vendor}; make test exports DATABASE_URL"
        )
    else:
        assert connection.vendor in ("postgresql", "sqlite")


def test_database_url_selects_the_engine(db):
    url = os.environ.get("DATABASE_URL", "")
    expected = "postgresql" if url.startswith(("postgres://", "postgresql://")) else "sqlite"
    assert connection.vendor == expected
