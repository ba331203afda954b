from django.contrib import admin

from .models import ApiToken, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "max_vips",
        "max_listeners_per_vip",
        "max_backends_per_listener",
        "created",
    ]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role", "created"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__name"]
    list_select_related = ["user", "tenant"]


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens are created through the API (the key is shown once); here they can be reviewed or revoked."""

    list_display = ["__str__", "user", "name", "write_enabled", "expires", "last_used", "created"]
    list_filter = ["write_enabled"]
    search_fields = ["user__username", "name", "key_lookup"]
    readonly_fields = ["key_lookup", "last_used", "created"]
    exclude = ["key_hash"]
    list_select_related = ["user"]

    def has_add_permission(self, request) -> bool:
        return False
