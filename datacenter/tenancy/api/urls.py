from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views

app_name = "tenancy-api"
router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("tenants", views.TenantViewSet)
router.register("memberships", views.MembershipViewSet)
router.register("tokens", views.ApiTokenViewSet)
urlpatterns = [path("whoami/", views.WhoAmIView.as_view(), name="whoami"), *router.urls]
