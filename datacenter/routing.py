"""Websocket routes: the agents' control channel (and, later, the live dashboard)."""

from django.urls import path

from datacenter.loadbalancing.consumers import AgentConsumer

websocket_urlpatterns: list = [
    path("ws/agents/", AgentConsumer.as_asgi()),
]
