"""REST API of hypervisors and conversion jobs: operators only, bad input named, stages shown."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from p2v.conversion import services
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.models import Assessment, Machine

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator() -> APIClient:
    client = APIClient()
    client.force_authenticate(get_user_model().objects.create_user("ops", password="x", is_staff=True))
    return client


def test_hypervisor_input_is_validated_naming_the_field(operator):
    bad = operator.post(
        "/api/p2v/hypervisors/",
        {
            "name": "kvm-1",
            "storage_pool": "p2v",
            "network": "vlan:7",
            "domain_type": "xen",
            "name_prefix": "P2V!",
        },
        format="json",
    )
    assert bad.status_code == 400
    assert set(bad.json()) >= {"network", "domain_type", "name_prefix"}
    good = operator.post("/api/p2v/hypervisors/", {"name": "kvm-1", "storage_pool": "p2v"}, format="json")
    assert good.status_code == 201, good.content
    assert good.json()["domain_type"] == "qemu"  # software emulation unless configured otherwise


def test_job_shows_stages_logs_and_refuses_a_second_cancel(operator):
    machine = Machine.objects.create(name="web-1", address="192.0.2.10")
    assessment = Assessment.objects.create(machine=machine, status="succeeded", facts={"schema": 1})
    hypervisor = Hypervisor.objects.create(name="hv", storage_pool="p2v")
    job = ConversionJob.objects.create(
        machine=machine, assessment=assessment, hypervisor=hypervisor, state="running", stage="adjust"
    )
    services.log(job, "changed /etc/fstab")
    detail = operator.get(f"/api/p2v/jobs/{job.pk}/").json()
    assert [(s["name"], s["status"]) for s in detail["stages"]] == [
        ("plan", "done"),
        ("copy", "done"),
        ("build", "done"),
        ("adjust", "running"),
        ("verify", "pending"),
    ]
    logs = operator.get(f"/api/p2v/jobs/{job.pk}/logs/").json()
    assert [line["message"] for line in logs] == ["changed /etc/fstab"]
    assert operator.get(f"/api/p2v/jobs/{job.pk}/logs/", {"after": logs[-1]["id"]}).json() == []
    assert operator.get(f"/api/p2v/jobs/{job.pk}/logs/", {"after": "x"}).status_code == 400
    assert operator.post(f"/api/p2v/jobs/{job.pk}/cancel/").status_code == 202
    job.refresh_from_db()
    assert job.cancel_requested
    ConversionJob.objects.filter(pk=job.pk).update(state="cancelled")
    refused = operator.post(f"/api/p2v/jobs/{job.pk}/cancel/")
    assert refused.status_code == 409
    assert "already finished" in refused.json()["detail"]


def test_start_conversion_refuses_a_machine_without_assessment_or_with_a_job_running():
    from p2v.models import ConversionEvent

    machine = Machine.objects.create(name="db-1", address="192.0.2.11")
    event = ConversionEvent.objects.create(machine=machine, kind="manual", status="started", raised_by="ops")
    Hypervisor.objects.create(name="hv", storage_pool="p2v")
    with pytest.raises(services.ConversionError, match="no successful assessment"):
        services.start_conversion(event)
    assessment = Assessment.objects.create(machine=machine, status="succeeded", facts={"schema": 1})
    event.assessment = assessment
    first = services.start_conversion(event)
    assert first.state == "queued"
    with pytest.raises(services.ConversionError, match="already has conversion"):
        services.start_conversion(event)
