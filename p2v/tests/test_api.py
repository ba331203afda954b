"""P2V REST API: admins (operators) only, write-only credentials, approvals, the OpenAPI schema."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from datacenter.events.models import AuditEntry
from p2v import services
from p2v.choices import ConversionEventKind, ConversionEventStatus
from p2v.models import Assessment, ConversionEvent, Machine

from .helpers import ed25519_key_pair, make_machine

pytestmark = pytest.mark.django_db
FINGERPRINT = "SHA256:" + "a" * 43


def client_for(is_staff: bool) -> APIClient:
    user = get_user_model().objects.create_user("admin" if is_staff else "tenant-user", is_staff=is_staff)
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def admin() -> APIClient:
    return client_for(True)


@pytest.fixture
def engine(monkeypatch):
    handed = []
    monkeypatch.setattr(
        services, "_conversion_hook", lambda name: handed.append if name == "start_conversion" else None
    )
    return handed


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/p2v/machines/"),
        ("post", "/api/p2v/machines/"),
        ("get", "/api/p2v/machines/{m}/"),
        ("post", "/api/p2v/machines/{m}/assess/"),
        ("post", "/api/p2v/machines/{m}/convert/"),
        ("get", "/api/p2v/assessments/"),
        ("get", "/api/p2v/events/"),
        ("post", "/api/p2v/events/{e}/approve/"),
        ("get", "/api/p2v/approvals/"),
        ("get", "/api/p2v/policies/"),
        ("get", "/api/p2v/security-events/"),
    ],
)
def test_only_admins_get_in(method, path):
    machine = make_machine()
    event = ConversionEvent.objects.create(
        machine=machine,
        kind=ConversionEventKind.HEALTH,
        raised_by="x",
        status=ConversionEventStatus.PENDING_APPROVAL,
    )
    url = path.format(m=machine.pk, e=event.pk)
    assert getattr(client_for(False), method)(url, {}, format="json").status_code == 403
    assert getattr(APIClient(), method)(url, {}, format="json").status_code == 401  # no credentials
    event.refresh_from_db()
    assert event.status == ConversionEventStatus.PENDING_APPROVAL
    assert not Assessment.objects.exists()


def test_create_machine_keeps_the_key_write_only_and_out_of_the_audit(admin):
    private, public = ed25519_key_pair()
    response = admin.post(
        "/api/p2v/machines/",
        {
            "name": "db-1",
            "address": "10.9.0.2",
            "private_key": private,
            "host_key_fingerprint": FINGERPRINT + "=",
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert "private_key" not in body
    assert "credential_ciphertext" not in body
    assert body["has_credential"] is True
    assert body["credential_public_key"] == " ".join(public.split()[:2])
    assert (body["host_key_fingerprint"], body["host_key_source"]) == (FINGERPRINT, "admin")
    assert Machine.objects.get(pk=body["id"]).private_key() == private
    audit = AuditEntry.objects.get(object_type="p2v.machine", action="create")
    assert "credential_ciphertext" not in audit.after
    assert private.splitlines()[1] not in str(audit.after)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("private_key", "not a key", "not an OpenSSH or PEM private key"),
        ("host_key_fingerprint", "MD5:00:11", "SHA256:' followed by 43 base64"),
        ("ssh_port", 70000, "less than or equal to 65535"),
    ],
)
def test_bad_machine_input_gets_a_clear_error(admin, field, value, message):
    payload = {"name": "db-1", "address": "10.9.0.2", "private_key": ed25519_key_pair()[0], field: value}
    response = admin.post("/api/p2v/machines/", payload, format="json")
    assert response.status_code == 400
    assert message in str(response.json()[field])


def test_new_machine_needs_a_key(admin):
    response = admin.post("/api/p2v/machines/", {"name": "db-1", "address": "10.9.0.2"}, format="json")
    assert response.status_code == 400
    assert "needs its SSH private key" in str(response.json())


def test_clearing_the_fingerprint_re_pins_on_next_contact(admin):
    machine = make_machine(host_key_fingerprint=FINGERPRINT, host_key_source="admin")
    response = admin.patch(f"/api/p2v/machines/{machine.pk}/", {"host_key_fingerprint": ""}, format="json")
    assert response.status_code == 200, response.content
    machine.refresh_from_db()
    assert (machine.host_key_fingerprint, machine.host_key_source) == ("", "")
    assert machine.private_key() == ed25519_key_pair()[0]  # untouched by a PATCH without a key


def test_assess_queues_one_task_on_commit(admin, django_capture_on_commit_callbacks):
    machine = make_machine()
    with django_capture_on_commit_callbacks(execute=False) as sent:
        response = admin.post(f"/api/p2v/machines/{machine.pk}/assess/")
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert Assessment.objects.get(pk=response.json()["id"]).requested_by.username == "admin"
    assert len(sent) == 1


def test_convert_raises_a_manual_event_that_starts(admin, engine):
    machine = make_machine()
    response = admin.post(
        f"/api/p2v/machines/{machine.pk}/convert/", {"reason": "retire the box"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["kind"], body["status"], body["raised_by"]) == ("manual", "started", "admin")
    assert body["job"] is None  # this stand-in engine records the event without making a job
    assert [e.pk for e in engine] == [body["id"]]


def test_convert_reports_why_the_engine_refused(admin, monkeypatch):
    def refuse(event):
        raise RuntimeError("machine has no successful assessment to convert from")

    monkeypatch.setattr(
        services, "_conversion_hook", lambda name: refuse if name == "start_conversion" else None
    )
    response = admin.post(f"/api/p2v/machines/{make_machine().pk}/convert/", {}, format="json")
    assert response.status_code == 409
    assert "no successful assessment" in response.json()["detail"]


def test_approve_and_reject(admin, engine):
    machine = make_machine()
    events = [
        ConversionEvent.objects.create(
            machine=machine,
            kind=ConversionEventKind.HEALTH,
            raised_by="health",
            status=ConversionEventStatus.PENDING_APPROVAL,
        )
        for _ in range(2)
    ]
    listed = admin.get("/api/p2v/approvals/").json()["results"]
    assert sorted(e["id"] for e in listed) == sorted(e.pk for e in events)

    approved = admin.post(f"/api/p2v/events/{events[0].pk}/approve/", {"note": "go"}, format="json")
    assert approved.status_code == 200
    assert (approved.json()["status"], approved.json()["decision_note"]) == ("started", "go")
    rejected = admin.post(f"/api/p2v/events/{events[1].pk}/reject/", {}, format="json")
    assert rejected.json()["status"] == "rejected"
    again = admin.post(f"/api/p2v/events/{events[1].pk}/approve/", {}, format="json")
    assert again.status_code == 409
    assert "not waiting for approval" in again.json()["detail"]
    assert admin.get("/api/p2v/approvals/").json()["results"] == []
    assert [e.pk for e in engine] == [events[0].pk]


def test_policy_validation(admin):
    response = admin.post(
        "/api/p2v/policies/", {"name": "p", "supported_firmware": ["bios", "coreboot"]}, format="json"
    )
    assert response.status_code == 400
    assert "coreboot" in str(response.json()["supported_firmware"])


def test_schema_lists_the_p2v_endpoints(admin):
    response = admin.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in (
        "/api/p2v/machines/",
        "/api/p2v/machines/{id}/assess/",
        "/api/p2v/machines/{id}/convert/",
        "/api/p2v/assessments/{id}/",
        "/api/p2v/events/{id}/approve/",
        "/api/p2v/events/{id}/reject/",
        "/api/p2v/approvals/",
        "/api/p2v/policies/",
        "/api/p2v/security-events/",
    ):
        assert path in paths, path
    machine_schema = response.json()["components"]["schemas"]["MachineRequest"]["properties"]
    assert "private_key" in machine_schema
    assert "private_key" not in response.json()["components"]["schemas"]["Machine"]["properties"]


def test_django_admin_machine_form_encrypts_the_key(client):
    user = get_user_model().objects.create_superuser("root-admin", password="x" * 12)
    client.force_login(user)
    private, _ = ed25519_key_pair()
    response = client.post(
        "/admin/p2v/machine/add/",
        {
            "name": "db-9",
            "address": "10.9.0.9",
            "ssh_port": 22,
            "ssh_user": "root",
            "private_key": private,
            "host_key_fingerprint": "",
            "connect_timeout_s": 10,
            "command_timeout_s": 30,
        },
    )
    assert response.status_code == 302, response.content[:2000]
    machine = Machine.objects.get(name="db-9")
    assert machine.private_key() == private
    assert private.splitlines()[1] not in machine.credential_ciphertext


def test_machine_list_query_count_does_not_grow_with_machines(admin, django_assert_max_num_queries):
    from p2v.choices import AssessmentStatus

    for index in range(6):
        machine = make_machine(f"m-{index}")
        Assessment.objects.create(machine=machine, status=AssessmentStatus.SUCCEEDED, facts={"schema": 1})
    with django_assert_max_num_queries(4):
        body = admin.get("/api/p2v/machines/").json()
    assert len(body["results"]) == 6
    assert all(item["latest_assessment"] for item in body["results"])
