"""Websocket routes: the agents' control channel, live P2V job progress and the dashboard pages."""

from django.urls import path

from datacenter.loadbalancing.consumers import AgentConsumer
from frontend.routing import websocket_urlpatterns as dashboard_routes
from p2v.conversion.routing import websocket_urlpatterns as p2v_job_routes

websocket_urlpatterns: list = [
    path("ws/agents/", AgentConsumer.as_asgi()),
    *p2v_job_routes,
    *dashboard_routes,
]
