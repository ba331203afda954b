"""Schema-driven fuzzing of the P2V API: generated valid and invalid requests never get a 5xx.

Requests come from the live OpenAPI schema (schemathesis), go in-process to the WSGI app as an
operator and as a non-operator, with path ids pointing at real rows half of the time.
"""

from __future__ import annotations

import logging

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from datacenter.testing import make_token, make_user
from p2v.choices import ConversionEventKind, ConversionEventStatus
from p2v.models import Assessment, ConversionEvent, ConversionPolicy, SecurityEvent

from .helpers import make_machine

# Bounded by examples, never by time: every operation gets its requests however slow the machine.
EXAMPLES_PER_OPERATION = 5


@pytest.fixture
def keep_test_connection():
    """The WSGI handler closes "old" connections per request; inside the test transaction it must not."""
    for signal in (request_started, request_finished):
        signal.disconnect(close_old_connections)
    yield
    for signal in (request_started, request_finished):
        signal.connect(close_old_connections)


@pytest.mark.slow
@pytest.mark.django_db
def test_p2v_api_never_answers_5xx(keep_test_connection):
    app = get_wsgi_application()
    keys = {
        "operator": make_token(make_user("fuzz-operator", operator=True)),
        "user": make_token(make_user("fuzz-user")),
    }
    machine = make_machine()
    event = ConversionEvent.objects.create(
        machine=machine,
        kind=ConversionEventKind.HEALTH,
        raised_by="fuzz",
        status=ConversionEventStatus.PENDING_APPROVAL,
    )
    real_ids = {
        "machines": machine.pk,
        "assessments": Assessment.objects.create(machine=machine).pk,
        "events": event.pk,
        "policies": ConversionPolicy.objects.create(name="fuzz").pk,
        "security-events": SecurityEvent.objects.create(
            machine=machine, address="x", port=22, message="m"
        ).pk,
    }
    schema = schemathesis.openapi.from_wsgi("/api/schema/", app)
    operations = [
        result.ok()
        for result in schema.get_all_operations()
        if result.ok().path.startswith("/api/p2v/")
        and "/hypervisors" not in result.ok().path
        and "/jobs" not in result.ok().path  # the conversion sub-app (issue 7) fuzzes its own
    ]
    assert len(operations) >= 15
    errors: list[str] = []
    sent: dict[str, int] = {}
    request_log = logging.getLogger("django.request")
    previous_level = request_log.level
    request_log.setLevel(logging.ERROR)  # hundreds of expected 4xx would drown a real failure
    try:
        for operation in operations:
            name = f"{operation.method.upper()} {operation.path}"
            sent[name] = _fuzz_operation(operation, keys, real_ids, errors)
    finally:
        request_log.setLevel(previous_level)
    starved = [name for name, count in sent.items() if count < 2]  # one example, both roles
    assert not starved, f"operations that were sent no request: {starved}"
    assert not errors, "server errors:\n" + "\n".join(errors[:10])


def _fuzz_operation(operation, keys: dict, real_ids: dict, errors: list[str]) -> int:
    resource = operation.path.split("/")[3]
    sent = 0
    strategy = st.tuples(
        st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        ),
        st.booleans(),
    )

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=strategy)
    def send(drawn):
        nonlocal sent
        case, use_real_id = drawn
        if use_real_id and case.path_parameters and "id" in case.path_parameters and resource in real_ids:
            case.path_parameters["id"] = real_ids[resource]
        for role, key in keys.items():
            headers = {"Authorization": f"Token {key}"}
            response = case.call(headers=headers)
            sent += 1
            if response.status_code >= 500:
                errors.append(
                    f"{response.status_code} as {role}: {case.as_curl_command(headers)} {response.text[:300]}"
                )

    send()
    return sent
