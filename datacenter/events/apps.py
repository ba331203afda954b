from django.apps import AppConfig


class EventsConfig(AppConfig):
    name = "datacenter.events"
    label = "events"
    verbose_name = "Events and audit"
