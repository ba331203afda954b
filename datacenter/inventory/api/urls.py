from rest_framework.routers import DefaultRouter

from . import views

app_name = "inventory-api"
router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("hosts", views.HostViewSet)
urlpatterns = router.urls
