"""The Celery application: Redis broker in production, in-memory broker in the embedded mode."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "datacenter.settings")

app = Celery("datacenter")
# Every CELERY_* setting in datacenter/settings.py configures this app.
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
