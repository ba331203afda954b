"""Websocket routes: the agents' control channel, live P2V job progress (and, later, the dashboard)."""

from django.urls import path

from datacenter.loadbalancing.consumers import AgentConsumer
from p2v.conversion.routing import websocket_urlpatterns as p2v_job_routes

websocket_urlpatterns: list = [
    path("ws/agents/", AgentConsumer.as_asgi()),
    *p2v_job_routes,
]
