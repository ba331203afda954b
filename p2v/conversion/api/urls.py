"""Conversion routes, included by p2v/api/urls.py under /api/p2v/."""

from django.urls import include, path
from rest_framework.routers import DefaultRouter

from .views import ConversionJobViewSet, HypervisorViewSet

router = DefaultRouter()
router.include_root_view = False
router.register("hypervisors", HypervisorViewSet, basename="p2v-hypervisor")
router.register("jobs", ConversionJobViewSet, basename="p2v-conversion-job")

urlpatterns = [
    path("", include(router.urls)),
]
