"""The REST API: every app's router, the OpenAPI schema and the interactive docs (no CDN)."""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from .views import StatusView

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="schema"), name="api-redoc"),
    path("status/", StatusView.as_view(), name="api-status"),
    path("", include("datacenter.tenancy.api.urls")),
    path("", include("datacenter.inventory.api.urls")),
    path("", include("datacenter.loadbalancing.api.urls")),
    path("", include("datacenter.events.api.urls")),
]
