from django.urls import include, path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "p2v-api"
router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("machines", views.MachineViewSet)
router.register("assessments", views.AssessmentViewSet)
router.register("events", views.ConversionEventViewSet)
router.register("approvals", views.ApprovalViewSet, basename="approval")
router.register("policies", views.ConversionPolicyViewSet)
router.register("security-events", views.SecurityEventViewSet)
urlpatterns = [*router.urls, path("", include("p2v.conversion.api.urls"))]  # conversion jobs
