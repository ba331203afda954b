"""The API contract, checked from outside: schemathesis (all checks; examples, coverage, fuzzing
and stateful phases) against the real portal under uvicorn, as an operator and as a tenant member.

All of schemathesis' checks run (tests/contract/schemathesis.toml enables them). Zero failures
means: no 5xx, every status and body an operation answers is in the schema, every
request the schema allows is accepted (save the two exceptions in schemathesis.toml, with the
reason) and every request it forbids is refused. The run is bounded by examples per operation
(CONTRACT_EXAMPLES, default 1: the coverage phase's boundary cases, thousands of them, are most
of the run), never by time, so every operation is exercised however slow the
machine; the seed is fixed so a failure reproduces (CONTRACT_SEED to vary it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from datacenter.testing import build_world
from tests.contract.server import PortalUnderUvicorn

HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "1"))
SEED = int(os.environ.get("CONTRACT_SEED", "20261206"))
RUN_TIMEOUT_S = 1700  # a hang, not slowness: the run itself is bounded by examples

# pytest-django creates the test database only for sessions with a test that asks for it.
pytestmark = [pytest.mark.django_db, pytest.mark.slow, pytest.mark.contract]


@pytest.fixture(scope="module")
def world_keys(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        keys = build_world().keys
    yield keys
    with django_db_blocker.unblock():
        call_command("flush", interactive=False, verbosity=0)


@pytest.fixture(scope="module")
def portal(world_keys, tmp_path_factory):
    with PortalUnderUvicorn(tmp_path_factory.mktemp("contract")) as server:
        yield server


@pytest.mark.timeout(1800)  # about 10 minutes per role on this two-core machine (2026-12-06)
@pytest.mark.parametrize("role", ["operator", "a_member"], ids=["operator", "tenant"])
def test_schemathesis_finds_nothing(portal, world_keys, role, tmp_path):
    report = tmp_path / "report.xml"
    argv = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(HERE / "schemathesis.toml"), "run",
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
