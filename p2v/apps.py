from django.apps import AppConfig


class P2VConfig(AppConfig):
    name = "p2v"
    verbose_name = "Physical to virtual"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Celery beat reads CELERY_BEAT_SCHEDULE through the settings object, so adding our tick to
        # that dict here (in place) schedules it without the project's settings knowing about P2V.
        from django.conf import settings

        from .tasks import TICK_INTERVAL_S

        schedule = getattr(settings, "CELERY_BEAT_SCHEDULE", None)
        if isinstance(schedule, dict):
            schedule.setdefault("p2v-tick", {"task": "p2v.tick", "schedule": TICK_INTERVAL_S})
