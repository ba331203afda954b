"""docker-compose.yml describes the production deployment (no Docker engine here: checked as data)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("postgres", "redis", "web", "worker", "beat")
PORTAL = ("web", "worker", "beat")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_exists_with_a_healthcheck(compose):
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    for name in SERVICES:
        check = services[name].get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck.test must be CMD or CMD-SHELL"
        assert len(check["test"]) >= 2
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck without {key}"


def test_state_lives_in_named_volumes(compose):
    declared = set(compose["volumes"])
    services = compose["services"]

    def named(service: str) -> set[str]:
        return {
            v.split(":", 1)[0] for v in services[service].get("volumes", []) if not v.startswith((".", "/"))
        }

    assert "postgres-data" in named("postgres")
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert "redis-data" in named("redis")
    used = set().union(*(named(s) for s in SERVICES))
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert "portal-var" in named("beat"), "beat keeps its schedule on a volume"


def test_portal_services_wait_for_healthy_database_and_redis(compose):
    for name in PORTAL:
        service = compose["services"][name]
        depends = service["depends_on"]
        for dependency in ("postgres", "redis"):
            assert depends[dependency]["condition"] == "service_healthy", f"{name} -> {dependency}"
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgres://")
        assert "@postgres:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert re.fullmatch(r"\$\{DJANGO_SECRET_KEY:\?.+\}", env["DJANGO_SECRET_KEY"]), (
            "no secret in the file"
        )
        assert (ROOT / "Dockerfile").exists() or "image" in service


def test_commands_run_the_real_components(compose):
    services = compose["services"]
    web = services["web"]["command"]
    assert "uvicorn datacenter.asgi:application" in web
    assert "migrate" in web
    assert services["worker"]["command"][:4] == ["celery", "-A", "datacenter", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "datacenter", "beat"]
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")


def test_web_healthcheck_url_exists(client, db):
    """The URL the web container's healthcheck polls answers 200 without credentials."""
    response = client.get("/healthz/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
