"""Per-hypervisor queues with a real Celery worker on Redis: a job waits in its hypervisor's queue
until a worker consumes that queue, then that worker runs it; the API says which hypervisors have
a live worker (asked from the workers themselves, so a worker that stops consuming drops out)."""

from __future__ import annotations

import secrets

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import override_settings
from rest_framework.test import APIClient

from datacenter.celery import app
from p2v.choices import ConversionEventKind, ConversionEventStatus
from p2v.conversion import services
from p2v.conversion.choices import FINISHED_STATES, JobState
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.models import Assessment, ConversionEvent, Machine
from tests.services import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def hypervisor_row(client: APIClient, hypervisor: Hypervisor) -> dict:
    response = client.get(f"/api/p2v/hypervisors/{hypervisor.pk}/")
    assert response.status_code == 200, response.content
    return response.json()


def test_jobs_go_to_their_hypervisors_queue_and_the_api_shows_its_live_worker(celery_worker):
    tag = secrets.token_hex(3)
    client = APIClient()
    client.force_authenticate(get_user_model().objects.create_user(f"ops-{tag}", is_staff=True))
    hypervisor = Hypervisor.objects.create(name=f"Rack 7 HV {tag}", storage_pool="p2v")
    queue = f"p2v-hv-rack-7-hv-{tag}"
    machine = Machine.objects.create(name=f"queued-{tag}", address="192.0.2.1")
    # Facts with no disks: the plan stage fails at once, which is enough to see who ran the job.
    assessment = Assessment.objects.create(machine=machine, status="succeeded", facts={"schema": 1})
    event = ConversionEvent.objects.create(
        machine=machine,
        kind=ConversionEventKind.MANUAL,
        status=ConversionEventStatus.STARTED,
        raised_by="test",
        assessment=assessment,
    )
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    with override_settings(P2V_HYPERVISOR_QUEUES=True):
        before = hypervisor_row(client, hypervisor)
        assert before["queue"] == queue
        assert before["workers"] == []
        assert before["worker_live"] is False

        job = services.start_conversion(event, hypervisor=hypervisor)
        # Published to the hypervisor's queue (a Redis list of that name), which nobody consumes yet.
        wait_until(lambda: broker.llen(queue) == 1, timeout_s=30, what=f"the job's task in {queue}")
        job.refresh_from_db()
        assert job.state == JobState.QUEUED

        replies = app.control.add_consumer(
            queue, destination=[celery_worker.nodename], reply=True, timeout=30
        )
        assert replies, "the worker did not answer add_consumer"
        try:
            wait_until(
                lambda: ConversionJob.objects.get(pk=job.pk).state in FINISHED_STATES,
                timeout_s=120,
                what="the hypervisor's worker to run the job",
            )
            job.refresh_from_db()
            assert job.state == JobState.FAILED
            assert "lists no disks" in job.error
            assert broker.llen(queue) == 0
            assert f"queue {queue}" in job.logs.order_by("pk").first().message

            after = wait_until(
                lambda: (row := hypervisor_row(client, hypervisor))["worker_live"] and row,
                timeout_s=60,
                what="the API to list the worker",
            )
            assert after["workers"] == [celery_worker.nodename]
        finally:
            app.control.cancel_consumer(queue, destination=[celery_worker.nodename], reply=True, timeout=30)
        gone = wait_until(
            lambda: (row := hypervisor_row(client, hypervisor))["worker_live"] is False and row,
            timeout_s=60,
            what="the API to drop the worker that stopped consuming the queue",
        )
        assert gone["workers"] == []


def test_names_that_would_share_a_queue_are_refused():
    client = APIClient()
    client.force_authenticate(get_user_model().objects.create_user("ops-names", is_staff=True))
    first = client.post("/api/p2v/hypervisors/", {"name": "kvm 1", "storage_pool": "p2v"}, format="json")
    assert first.status_code == 201, first.content
    clash = client.post("/api/p2v/hypervisors/", {"name": "KVM-1", "storage_pool": "p2v"}, format="json")
    assert clash.status_code == 400
    assert "p2v-hv-kvm-1" in clash.json()["name"][0]
    assert "'kvm 1'" in clash.json()["name"][0]
    nameless = client.post("/api/p2v/hypervisors/", {"name": "!!!", "storage_pool": "p2v"}, format="json")
    assert nameless.status_code == 400
    assert "queue" in nameless.json()["name"][0]
