"""URL map: admin, the REST API under /api/, the server-rendered frontend at /."""

from django.contrib import admin
from django.urls import include, path

from datacenter.api.fields import use_strict_model_fields
from datacenter.metrics import metrics_view
from frontend.health import healthz

# Before any serializer builds its fields (the first request resolves this module first).
use_strict_model_fields()

urlpatterns = [
    path("healthz/", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/", include("datacenter.api.urls")),
    path("api/p2v/", include("p2v.api.urls")),
    path("", include("frontend.urls")),
]

handler404 = "datacenter.api.views.api_not_found"
