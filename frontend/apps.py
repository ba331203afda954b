from django.apps import AppConfig


class FrontendConfig(AppConfig):
    name = "frontend"
    verbose_name = "Operator dashboard"

    def ready(self) -> None:
        from django.db.models.signals import post_save

        from datacenter.events.models import Event

        from .live import announce_event

        post_save.connect(announce_event, sender=Event, dispatch_uid="frontend.announce_event")
