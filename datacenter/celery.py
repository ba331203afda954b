"""The Celery application: Redis broker in production, in-memory broker in the embedded mode."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")

app = Celery("datacenter")
# Every CELERY_* setting in datacenter/settings.py configures this app.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


# Task outcomes for /metrics (datacenter/metrics.py): counted in Redis by whichever worker ran the
# task, because the web process that is scraped never sees a task finish.
@signals.task_success.connect
def _count_success(sender=None, **_kwargs):
    from datacenter.metrics import count_task_outcome

    count_task_outcome(getattr(sender, "name", "?"), "succeeded")


@signals.task_failure.connect
def _count_failure(sender=None, **_kwargs):
    from datacenter.metrics import count_task_outcome

    count_task_outcome(getattr(sender, "name", "?"), "failed")


@signals.task_retry.connect
def _count_retry(sender=None, **_kwargs):
    from datacenter.metrics import count_task_outcome

    count_task_outcome(getattr(sender, "name", "?"), "retried")
