from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "events-api"
router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("audit", views.AuditEntryViewSet)
urlpatterns = [path("events/", views.EventFeedView.as_view(), name="event-feed"), *router.urls]
