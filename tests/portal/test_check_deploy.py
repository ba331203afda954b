"""`manage.py check --deploy` is clean (not one warning) with the production environment that
docker-compose.yml gives the portal services, read from the file itself."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_environment(tmp_path: Path) -> dict[str, str]:
    """The web service's environment, as compose would resolve it with only the required secrets set."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    required = {"DJANGO_SECRET_KEY": secrets.token_urlsafe(60), "POSTGRES_PASSWORD": "compose-check"}
    env = {}
    for name, value in compose["services"]["web"]["environment"].items():
        value = REQUIRED.sub(lambda m: required[m.group(1)], str(value))
        env[name] = DEFAULTED.sub(lambda m: m.group(2), value)
    env["DATACENTER_VAR_DIR"] = str(tmp_path)  # the container's /var/lib/datacenter
    return env


def test_check_deploy_is_clean_with_the_compose_production_settings(tmp_path):
    env = compose_environment(tmp_path)
    assert env["DJANGO_SECURE_COOKIES"] == "1"
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_healthz_stays_reachable_over_plain_http_when_redirecting(settings, client, db):
    settings.SECURE_SSL_REDIRECT = True
    assert client.get("/healthz/").status_code != 301  # the container healthcheck speaks HTTP
    assert client.get("/login/").status_code == 301
