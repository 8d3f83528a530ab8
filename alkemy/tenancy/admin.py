from django.contrib import admin, messages
from django.utils import timezone

from alkemy.tenancy.admin_base import TenantScopedAdmin, _roles_by_tenant, writable_tenant_ids
from alkemy.tenancy.models import MANAGE_ROLES, ApiKey, Membership, Tenant
from alkemy.tenancy.services import api_key_create


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]

    def get_queryset(self, request):
        return Membership.objects.unscoped().select_related("user")


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_active", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]

    def get_inlines(self, request, obj):
        return self.inlines if request.user.is_superuser else []

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        return queryset.filter(pk__in=list(_roles_by_tenant(request)))

    def get_readonly_fields(self, request, obj=None):
        return [] if request.user.is_superuser else ["slug", "is_active"]

    def has_module_permission(self, request):
        return request.user.is_superuser or bool(_roles_by_tenant(request))

    def has_view_permission(self, request, obj=None):
        return (
            request.user.is_superuser
            or (obj is None and bool(_roles_by_tenant(request)))
            or (obj is not None and obj.pk in _roles_by_tenant(request))
        )

    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        roles = _roles_by_tenant(request)
        if obj is None:
            return any(role in MANAGE_ROLES for role in roles.values())
        return roles.get(obj.pk) in MANAGE_ROLES

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


@admin.register(Membership)
class MembershipAdmin(TenantScopedAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "user__email", "tenant__slug"]
    autocomplete_fields = ["user"]

    def has_change_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        roles = _roles_by_tenant(request)
        if obj is None:
            return any(role in MANAGE_ROLES for role in roles.values())
        return roles.get(obj.tenant_id) in MANAGE_ROLES

    def has_add_permission(self, request):
        return request.user.is_superuser  # creating users and inviting them is an operator task

    def get_autocomplete_fields(self, request):
        return self.autocomplete_fields if request.user.is_superuser else []

    def get_readonly_fields(self, request, obj=None):
        return [] if request.user.is_superuser else ["user", "tenant"]


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    list_display = ["name", "tenant", "role", "display_prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["tenant", "role"]
    search_fields = ["name", "prefix", "tenant__slug"]
    readonly_fields = ["display_prefix", "created_by", "created_at", "last_used_at"]
    fields = ["tenant", "name", "role", "display_prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    @admin.display(description="Key prefix")
    def display_prefix(self, obj):
        return f"ak_{obj.prefix}_…" if obj.prefix else "(generated on save)"

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        api_key, plaintext = api_key_create(tenant=obj.tenant, name=obj.name, role=obj.role, created_by=request.user)
        obj.pk = api_key.pk
        obj.prefix = api_key.prefix
        obj.secret_hash = api_key.secret_hash
        obj.created_at = api_key.created_at
        messages.warning(
            request,
            f"New API key for {api_key.tenant.slug} — copy it now, it is not shown again: {plaintext}",
        )

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke(self, request, queryset):
        if not request.user.is_superuser:
            queryset = queryset.filter(tenant__in=writable_tenant_ids(request))
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).")
