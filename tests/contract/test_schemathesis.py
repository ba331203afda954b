"""The API contract, checked from outside: schemathesis (all checks; examples, coverage, fuzzing
and stateful phases) against the real portal under uvicorn, as an operator and as a tenant member.

All of schemathesis' checks run (tests/contract/schemathesis.toml enables them). Zero failures
means: no 5xx, every status and body an operation answers is in the schema, every
request the schema allows is accepted (save the two exceptions in schemathesis.toml, with the
reason) and every request it forbids is refused. The run is bounded by examples per operation
(CONTRACT_EXAMPLES, default 1: the coverage phase's boundary cases, thousands of them, are most
of the run), never by time, so every operation is exercised however slow the
machine; the seed is fixed so a failure reproduces (CONTRACT_SEED to vary it).

Each role gets a world of its own (the operator's run deletes tenants and VIPs; the tenant's run
would otherwise start from what was left). The run must not revoke the credential it runs with:
the token operations (`/api/tokens/{id}/...`: rotate, delete, an `expires` in the past, a
read-only scope) act on the caller's own tokens, and once they hit the run's token every later
request was a 401, so most operations were "tested" only with 401s and still passed. They are
pointed at a spare token of the same user instead, and the run fails if any operation answered
only 401 or if the run's token no longer works at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from datacenter.testing import build_world
from tests.contract.server import PortalUnderUvicorn

HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "1"))
SEED = int(os.environ.get("CONTRACT_SEED", "20261206"))
RUN_TIMEOUT_S = 1700  # a hang, not slowness: the run itself is bounded by examples

# transaction=True: each role's world is committed (the portal is another process) and flushed
# after its run.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow, pytest.mark.contract]


@pytest.fixture(scope="module")
def portal(django_db_setup, tmp_path_factory):
    with PortalUnderUvicorn(tmp_path_factory.mktemp("contract")) as server:
        yield server


@pytest.fixture
def world(transactional_db):
    """A fresh world for one role's run, and a spare token per user for the token operations."""
    from django.contrib.auth import get_user_model

    from datacenter.tenancy.models import ApiToken

    built = build_world()  # the users are named after their roles
    spare = {role: ApiToken.objects.create_token(get_user_model().objects.get(username=role),
                                                 name="contract-spare")[0].pk
             for role in built.keys}
    return built.keys, spare


def _answers_with(portal: PortalUnderUvicorn, key: str) -> int:
    import requests  # schemathesis' own HTTP client

    return requests.get(f"{portal.http_url}/api/tokens/", headers={"Authorization": f"Token {key}"},
                        timeout=60).status_code


def _config(tmp_path: Path, spare_token_id: int) -> Path:
    """schemathesis.toml plus the token operations pointed at the spare token (its id as an
    integer: a string would be a schema-violating path parameter)."""
    config = tmp_path / "schemathesis.toml"
    sections = "".join(
        f'\n[[operations]]\ninclude-path = "{path}"\nparameters = {{ "path.id" = {spare_token_id} }}\n'
        for path in ("/api/tokens/{id}/", "/api/tokens/{id}/rotate/")
    )
    config.write_text((HERE / "schemathesis.toml").read_text() + sections)
    return config


@pytest.mark.timeout(1800)  # 3-4 minutes per role on this two-core machine (2026-12-06); a hang, not slowness
@pytest.mark.parametrize("role", ["operator", "a_member"], ids=["operator", "tenant"])
def test_schemathesis_finds_nothing(portal, world, role, tmp_path):
    world_keys, spare_token = world
    report = tmp_path / "report.xml"
    config = _config(tmp_path, spare_token[role])
    argv = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{portal.http_url}/api/schema/",
        "--header", f"Authorization: Token {world_keys[role]}",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--request-timeout", "60",
        "--report", "junit", "--report-junit-path", str(report),
    ]
    if os.environ.get("CONTRACT_PATHS"):  # a regular expression, to re-check a few operations
        argv += ["--include-path-regex", os.environ["CONTRACT_PATHS"]]
    # cwd: schemathesis keeps a cache (.schemathesis/) in its working directory, not in the checkout
    run = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ},
                         cwd=tmp_path)
    output = run.stdout + run.stderr
    assert "Tested: " in output, output[-5000:]
    tested = output.split("Tested: ", 1)[1].split()[0]
    selected = output.split("Selected: ", 1)[1].split()[0].split("/")[0]  # "21/99" when filtered
    assert tested == selected, f"only {tested} of {selected} operations were tested\n{output[-5000:]}"
    assert run.returncode == 0, f"schemathesis as {role} failed:\n{output[-20000:]}\n{portal.log()[-3000:]}"
    # A run whose credential stopped working passes while testing nothing but 401s.
    assert "401 Unauthorized (" not in output, f"operations answered only 401 as {role}:\n{output[-20000:]}"
    assert _answers_with(portal, world_keys[role]) == 200, f"the run revoked its own token ({role})"
