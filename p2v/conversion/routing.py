"""Websocket routes of the conversion app (included by datacenter/routing.py)."""

from django.urls import path

from .consumers import ConversionJobConsumer

websocket_urlpatterns = [
    path("ws/p2v/jobs/<int:job_id>/", ConversionJobConsumer.as_asgi()),
]
