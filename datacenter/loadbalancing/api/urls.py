from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views
from .status import VipStatusView

app_name = "loadbalancing-api"
router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("vip-pools", views.VipPoolViewSet)
router.register("vips", views.VipViewSet)
router.register("listeners", views.ListenerViewSet)
router.register("backends", views.BackendViewSet)
router.register("generations", views.GenerationViewSet)
router.register("agent-nodes", views.AgentNodeViewSet)
urlpatterns = [*router.urls, path("vips/<int:pk>/status/", VipStatusView.as_view(), name="vip-status")]
