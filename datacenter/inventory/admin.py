from django.contrib import admin

from .models import Host


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    list_display = ["name", "management_address", "roles", "tenant", "created"]
    list_filter = ["tenant"]
    search_fields = ["name", "management_address"]
    list_select_related = ["tenant"]
