import os

from django.apps import AppConfig


class ConversionConfig(AppConfig):
    name = "p2v.conversion"
    label = "p2v_conversion"
    verbose_name = "P2V conversion"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Like p2v's tick (p2v/apps.py): the lease watchdog joins the beat schedule in place.
        # P2V_WATCHDOG_QUEUE sends it to a queue of your choice (default: Celery's default queue).
        from django.conf import settings

        from .watchdog import interval_seconds

        schedule = getattr(settings, "CELERY_BEAT_SCHEDULE", None)
        if isinstance(schedule, dict):
            entry = {"task": "p2v.conversion.watchdog", "schedule": interval_seconds()}
            if os.environ.get("P2V_WATCHDOG_QUEUE"):
                entry["options"] = {"queue": os.environ["P2V_WATCHDOG_QUEUE"]}
            schedule.setdefault("p2v-conversion-watchdog", entry)
