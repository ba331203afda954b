"""Schema-driven fuzzing: every operation of /api/schema/, valid and invalid inputs, never a 5xx.

Schemathesis generates requests from the live OpenAPI schema (positive and negative data) and
sends them in-process to the Django WSGI app, as an operator and as a tenant member. The run is
bounded by examples per operation (FUZZ_EXAMPLES), never by time: a time budget let later
operations get no request at all on a slow machine and still pass. Every operation must get
requests; every 5xx found is reported with a curl command reproducing it. (The full contract,
every check of schemathesis against the real server, is tests/contract/.)
"""

from __future__ import annotations

import logging
import os

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from datacenter.testing import World

EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "4"))
ROLES = ("operator", "a_member")


@pytest.fixture
def keep_test_connection():
    """Requests go straight to the WSGI app, which closes "old" connections at the start and end of
    each request; inside the test's transaction that would close it. Django's test client does the
    same disconnection for its requests."""
    signals = (request_started, request_finished)
    for signal in signals:
        signal.disconnect(close_old_connections)
    yield
    for signal in signals:
        signal.connect(close_old_connections)


@pytest.mark.slow
def test_no_server_error_for_any_generated_request(world: World, keep_test_connection):
    app = get_wsgi_application()  # (re)configures logging, so quieten afterwards
    request_log = logging.getLogger("django.request")
    previous_level = request_log.level
    request_log.setLevel(logging.ERROR)  # thousands of expected 4xx would drown a real failure's log
    try:
        _fuzz(world, app)
    finally:
        request_log.setLevel(previous_level)


def _fuzz(world: World, app) -> None:
    schema = schemathesis.openapi.from_wsgi("/api/schema/", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40, "the schema lists every endpoint"
    server_errors: list[str] = []
    sent_per_operation: dict[str, int] = {}

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        sent_per_operation[label] = 0
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def send(case):
            for role in ROLES:
                headers = {"Authorization": f"Token {world.keys[role]}"}
                response = case.call(headers=headers)
                sent_per_operation[label] += 1  # noqa: B023
                if response.status_code >= 500:
                    detail = response.text[:300] if not server_errors else ""
                    server_errors.append(
                        f"{response.status_code} as {role}: {case.as_curl_command(headers)} {detail}"
                    )

        send()

    sent = sum(sent_per_operation.values())
    print(
        f"schema fuzz: {sent} requests over {len(operations)} operations, {len(server_errors)} server errors"
    )
    starved = sorted(label for label, count in sent_per_operation.items() if count == 0)
    assert not starved, f"operations that got no request: {starved}"
    assert not server_errors, "server errors:\n" + "\n".join(server_errors[:20])
