"""The P2V lease and its watchdog against the real database and Redis broker (no root, no libvirt):
what happens to a job whose worker stopped renewing its lease, and which messages may run it."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from p2v.choices import ConversionEventKind, ConversionEventStatus
from p2v.conversion import lease, watchdog
from p2v.conversion.choices import JobStage, JobState
from p2v.conversion.models import ConversionJob, Hypervisor
from p2v.models import Assessment, ConversionEvent, Machine
from tests.environment import need
from tests.services import redis_answers

pytestmark = [pytest.mark.chaos, pytest.mark.django_db]


@pytest.fixture
def broker() -> redis.Redis:
    need(
        redis_answers(getattr(settings, "REDIS_URL", None)), "needs Redis (the watchdog queues real messages)"
    )
    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


@pytest.fixture
def hypervisor_queue(broker):
    """A hypervisor whose queue nobody consumes: the watchdog's messages stay there to be read."""
    tag = secrets.token_hex(3)
    hypervisor = Hypervisor.objects.create(name=f"wd-{tag}", storage_pool="none")
    queue = f"p2v-hv-wd-{tag}"
    with override_settings(P2V_HYPERVISOR_QUEUES=True):
        yield hypervisor, queue
    broker.delete(queue)


def make_job(hypervisor: Hypervisor, **fields) -> ConversionJob:
    tag = secrets.token_hex(3)
    machine = Machine.objects.create(name=f"wd-machine-{tag}", address="192.0.2.10")
    assessment = Assessment.objects.create(machine=machine, status="succeeded", facts={"schema": 1})
    event = ConversionEvent.objects.create(
        machine=machine,
        kind=ConversionEventKind.MANUAL,
        status=ConversionEventStatus.STARTED,
        raised_by="test",
        assessment=assessment,
    )
    return ConversionJob.objects.create(
        machine=machine, assessment=assessment, event=event, hypervisor=hypervisor, **fields
    )


def running_job(hypervisor: Hypervisor, expires_in_s: float, **fields) -> ConversionJob:
    defaults = {
        "state": JobState.RUNNING,
        "stage": JobStage.COPY,
        "lease_token": "a" * 32,
        "lease_owner": "p2v-hv-x@host-7",
        "lease_pid": 4242,
        "lease_expires": timezone.now() + timedelta(seconds=expires_in_s),
    }
    return make_job(hypervisor, **{**defaults, **fields})


def queued_messages(broker: redis.Redis, queue: str) -> list[dict]:
    """The task messages waiting in `queue`: task name and arguments, as Celery wrote them."""
    messages = [json.loads(raw) for raw in broker.lrange(queue, 0, -1)]
    return [{"task": m["headers"]["task"], "args": m["headers"]["argsrepr"]} for m in messages]


def test_expired_lease_requeues_the_job_at_its_stage_and_says_which_worker_was_lost(
    broker, hypervisor_queue, django_capture_on_commit_callbacks
):
    hypervisor, queue = hypervisor_queue
    job = running_job(hypervisor, expires_in_s=-5)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = watchdog.check_leases()
    assert outcome["resumed"] == [job.pk]
    job.refresh_from_db()
    assert job.state == JobState.QUEUED  # no longer "running": nobody runs it until a worker takes it
    assert job.stage == JobStage.COPY
    assert (job.lease_token, job.lease_owner, job.lease_pid, job.lease_expires) == ("", "", None, None)
    assert job.resumes == 1
    assert job.lost_worker == "p2v-hv-x@host-7 (pid 4242)"
    last = job.logs.order_by("pk").last().message
    assert "worker p2v-hv-x@host-7 (pid 4242) lost during copy" in last
    assert "does not answer pings" in last
    assert "resume 1 of 3" in last
    assert queued_messages(broker, queue) == [
        {"task": "p2v.conversion.run_stage", "args": f"({job.pk}, 'copy')"}
    ]


def test_after_the_last_allowed_resume_the_job_fails_with_the_reason_and_rolls_back(
    broker, hypervisor_queue, django_capture_on_commit_callbacks
):
    hypervisor, queue = hypervisor_queue
    job = running_job(hypervisor, expires_in_s=-1, stage=JobStage.VERIFY, resumes=2)
    with override_settings(P2V_JOB_MAX_RESUMES=2), django_capture_on_commit_callbacks(execute=True):
        outcome = watchdog.check_leases()
    assert outcome["failed"] == [job.pk]
    job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert job.finished is not None
    assert "worker p2v-hv-x@host-7 (pid 4242) lost during verify" in job.error
    assert "after 2 resume(s), the most P2V_JOB_MAX_RESUMES allows (2): rolled back" in job.error
    assert job.lease_token == ""
    job.event.refresh_from_db()
    assert job.event.status == ConversionEventStatus.FAILED
    assert queued_messages(broker, queue) == []  # nothing re-queued


def test_live_leases_and_finished_jobs_are_left_alone(
    broker, hypervisor_queue, django_capture_on_commit_callbacks
):
    hypervisor, queue = hypervisor_queue
    live = running_job(hypervisor, expires_in_s=30)
    finished = running_job(hypervisor, expires_in_s=-30, state=JobState.SUCCEEDED)
    between = make_job(
        hypervisor, state=JobState.RUNNING, stage=JobStage.BUILD
    )  # no lease: not running a stage
    with django_capture_on_commit_callbacks(execute=True):
        outcome = watchdog.check_leases()
    assert outcome == {"resumed": [], "requeued": [], "failed": []}
    for job, state in ((live, JobState.RUNNING), (finished, JobState.SUCCEEDED), (between, JobState.RUNNING)):
        job.refresh_from_db()
        assert job.state == state
    assert queued_messages(broker, queue) == []


def test_an_expired_hand_over_is_queued_again_without_counting_a_lost_worker(
    broker, hypervisor_queue, django_capture_on_commit_callbacks
):
    hypervisor, queue = hypervisor_queue
    job = running_job(hypervisor, expires_in_s=-1, stage=JobStage.ADJUST, lease_owner="", lease_pid=None)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = watchdog.check_leases()
    assert outcome["requeued"] == [job.pk]
    job.refresh_from_db()
    assert (job.state, job.resumes, job.lost_worker) == (JobState.QUEUED, 0, "")
    assert "was not taken up within its lease" in job.logs.order_by("pk").last().message
    assert queued_messages(broker, queue) == [
        {"task": "p2v.conversion.run_stage", "args": f"({job.pk}, 'adjust')"}
    ]


def test_claim_decides_which_message_may_run_the_job(db):
    hypervisor = Hypervisor.objects.create(name=f"claim-{secrets.token_hex(3)}", storage_pool="none")
    me = lease.Holder("worker-b@host", 77)

    held = running_job(hypervisor, expires_in_s=30)
    busy = lease.claim(held.pk, me, "copy")
    assert busy.lease is None
    assert 25 < busy.busy_for_s <= 30
    assert "held by p2v-hv-x@host-7" in busy.why

    stale = lease.claim(held.pk, me, "plan")
    assert stale.lease is None
    assert stale.busy_for_s == 0
    assert "the job is at stage copy" in stale.why

    handed = lease.claim(held.pk, me, "copy", handoff="a" * 32)  # the previous stage passed this token on
    assert handed.lease is not None
    assert handed.lost_worker == ""

    expired = running_job(hypervisor, expires_in_s=-1)
    resumed = lease.claim(expired.pk, me, "copy")  # a redelivery that notices the loss before the watchdog
    assert resumed.lease is not None
    assert resumed.lost_worker == "p2v-hv-x@host-7 (pid 4242)"
    expired.refresh_from_db()
    assert (expired.lease_owner, expired.lease_pid) == ("worker-b@host", 77)
    assert expired.lease_expires > timezone.now()

    done = running_job(hypervisor, expires_in_s=-1, state=JobState.FAILED)
    assert lease.claim(done.pk, me).lease is None


def test_a_run_whose_lease_was_taken_over_notices_it(db):
    hypervisor = Hypervisor.objects.create(name=f"lost-{secrets.token_hex(3)}", storage_pool="none")
    job = running_job(hypervisor, expires_in_s=-1)
    first = lease.claim(job.pk, lease.Holder("a@h", 1)).lease
    assert first.renew()
    ConversionJob.objects.filter(pk=job.pk).update(lease_expires=timezone.now() - timedelta(seconds=1))
    second = lease.claim(job.pk, lease.Holder("b@h", 2)).lease
    assert second is not None
    assert not first.renew()
    with pytest.raises(lease.LeaseLost):
        first.check()
    first.release()  # releasing a lost lease leaves the new holder's alone
    job.refresh_from_db()
    assert job.lease_token == second.token


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("P2V_JOB_LEASE_S", "soon", "P2V_JOB_LEASE_S must be a number of seconds, got 'soon'"),
        ("P2V_JOB_LEASE_S", "0", "P2V_JOB_LEASE_S must be a positive number of seconds, got '0'"),
        ("P2V_JOB_MAX_RESUMES", "-1", "P2V_JOB_MAX_RESUMES must be 0 or more, got '-1'"),
        ("P2V_JOB_MAX_RESUMES", "two", "P2V_JOB_MAX_RESUMES must be a whole number, got 'two'"),
    ],
)
def test_bad_settings_are_named(name, value, message):
    with override_settings(**{name: value}), pytest.raises(ValueError) as raised:
        lease.lease_seconds() if name == "P2V_JOB_LEASE_S" else watchdog.max_resumes()
    assert str(raised.value) == message


def test_heartbeat_is_at_most_a_third_of_the_lease():
    with override_settings(P2V_JOB_LEASE_S="6", P2V_JOB_HEARTBEAT_S="5"):
        assert lease.heartbeat_seconds() == 2.0
    with override_settings(P2V_JOB_LEASE_S=None, P2V_JOB_HEARTBEAT_S=None):
        assert (lease.lease_seconds(), lease.heartbeat_seconds()) == (45.0, 5.0)


def test_run_stage_drops_a_stale_message_and_defers_a_duplicate_without_touching_the_job(db):
    from p2v.conversion import services

    hypervisor = Hypervisor.objects.create(name=f"dup-{secrets.token_hex(3)}", storage_pool="none")
    job = running_job(hypervisor, expires_in_s=30)
    before = job.logs.count()
    assert services.run_stage(job.pk, stage="plan") is False  # the job is at copy: nothing to do
    with pytest.raises(lease.JobBusy) as busy:
        services.run_stage(job.pk, stage="copy")  # a live run holds it: the task retries later
    assert 25 < busy.value.retry_in_s <= 30
    job.refresh_from_db()
    assert (job.state, job.stage, job.lease_owner, job.lease_pid) == (
        JobState.RUNNING,
        "copy",
        "p2v-hv-x@host-7",
        4242,
    )
    assert job.logs.count() == before
