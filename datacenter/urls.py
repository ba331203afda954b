"""URL map: admin, the REST API under /api/, the server-rendered frontend at /."""

from django.contrib import admin
from django.urls import include, path

from frontend.health import healthz

urlpatterns = [
    path("healthz/", healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("api/", include("datacenter.api.urls")),
    path("api/p2v/", include("p2v.api.urls")),
    path("", include("frontend.urls")),
]
