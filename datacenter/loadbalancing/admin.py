"""Admin for operators. Backend lists change only through services (so generations are made)."""

from django.contrib import admin

from .models import AgentNode, Backend, Generation, Listener, Vip, VipPool


@admin.register(VipPool)
class VipPoolAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "shared", "created"]
    search_fields = ["name", "prefix"]
    filter_horizontal = ["tenants"]


@admin.register(Vip)
class VipAdmin(admin.ModelAdmin):
    list_display = ["name", "address", "tenant", "pool", "provisioning_status", "operating_status"]
    list_filter = ["tenant", "provisioning_status", "operating_status"]
    search_fields = ["name", "address"]
    list_select_related = ["tenant", "pool"]

    def get_readonly_fields(self, request, obj=None):
        return ["tenant", "pool", "address"] if obj else []


class BackendInline(admin.TabularInline):
    model = Backend
    extra = 0
    can_delete = False
    fields = ["position", "address", "port", "weight", "admin_state", "host"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Listener)
class ListenerAdmin(admin.ModelAdmin):
    list_display = ["__str__", "protocol", "port", "generation", "provisioning_status", "operating_status"]
    list_filter = ["protocol", "provisioning_status"]
    readonly_fields = ["generation"]
    list_select_related = ["vip"]
    inlines = [BackendInline]


@admin.register(Backend)
class BackendAdmin(admin.ModelAdmin):
    list_display = ["__str__", "listener", "position", "weight", "admin_state", "host"]
    list_filter = ["admin_state"]
    search_fields = ["address"]
    list_select_related = ["listener__vip", "host"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Generation)
class GenerationAdmin(admin.ModelAdmin):
    list_display = ["listener", "number", "author_name", "request_id", "created"]
    readonly_fields = [
        "listener",
        "number",
        "backends",
        "changes",
        "author",
        "author_name",
        "request_id",
        "created",
    ]
    list_select_related = ["listener__vip"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(AgentNode)
class AgentNodeAdmin(admin.ModelAdmin):
    list_display = ["name", "role", "host", "address", "enabled", "last_seen", "applied_generation"]
    list_filter = ["role", "enabled"]
    search_fields = ["name"]
    readonly_fields = ["token_lookup", "last_seen", "applied_generation", "applied_at", "last_stats"]
    exclude = ["token_hash"]
    list_select_related = ["host"]
