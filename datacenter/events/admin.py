from django.contrib import admin

from .models import AuditEntry, Event


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["time", "actor", "action", "object_type", "object_repr", "tenant", "request_id"]
    list_filter = ["action", "object_type"]
    search_fields = ["actor", "object_repr", "request_id"]


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["id", "time", "kind", "object_type", "object_id", "tenant"]
    list_filter = ["kind"]
