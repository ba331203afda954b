from django.contrib.auth import views as auth_views
from django.urls import path

from . import views

app_name = "frontend"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("vips/", views.vip_list, name="vips"),
    path("vips/<int:pk>/", views.vip_detail, name="vip"),
    path(
        "vips/<int:vip_pk>/listeners/<int:listener_pk>/backends/", views.backend_editor, name="backend-editor"
    ),
    path("vips/<int:vip_pk>/backends/<int:backend_pk>/state/", views.backend_state, name="backend-state"),
    path("agents/", views.agent_list, name="agents"),
    path("hosts/", views.host_list, name="hosts"),
    path("hosts/<int:pk>/", views.host_detail, name="host"),
    path("tenants/", views.tenant_list, name="tenants"),
    path("tenants/<int:pk>/", views.tenant_detail, name="tenant"),
    path("pools/", views.pool_list, name="pools"),
    path("pools/<int:pk>/", views.pool_detail, name="pool"),
    path("p2v/machines/", views.machine_list, name="p2v-machines"),
    path("p2v/machines/<int:pk>/", views.machine_detail, name="p2v-machine"),
    path("p2v/events/", views.event_list, name="p2v-events"),
    path("p2v/events/<int:pk>/decide/", views.event_decide, name="p2v-event-decide"),
    path("p2v/jobs/", views.job_list, name="p2v-jobs"),
    path("p2v/jobs/<int:pk>/", views.job_detail, name="p2v-job"),
    path("audit/", views.audit_log, name="audit"),
]
