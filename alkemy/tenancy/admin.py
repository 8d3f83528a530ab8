from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin, _roles_by_tenant
from alkemy.tenancy.models import MANAGE_ROLES, ApiKey, Membership, Tenant
from alkemy.tenancy.services import api_key_create, tenant_delete


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]

    def get_queryset(self, request):
        return Membership.objects.unscoped().select_related("user")


class TenantForm(forms.ModelForm):
    gemini_api_key = forms.CharField(
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False),
        help_text="The studio's own Gemini API key (stored encrypted). Leave empty to keep the current one.",
    )
    clear_gemini_api_key = forms.BooleanField(required=False, help_text="Remove the key: the global one is used.")

    class Meta:
        model = Tenant
        fields = ["slug", "name", "is_active"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    form = TenantForm
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
        masked = ["gemini_key_in_use"]
        return masked if request.user.is_superuser else [*masked, "slug", "is_active"]

    @admin.display(description="Gemini key in use")
    def gemini_key_in_use(self, obj):
        from alkemy.crypto import secret_status

        status, masked = secret_status(obj.gemini_api_key_encrypted if obj is not None else "")
        if status == "unset":
            return "the global key (GEMINI_API_KEY / GOOGLE_API_KEY)"
        if status == "unreadable":
            return "unreadable: the server's encryption key changed. Enter the key again; Gemini jobs fail until then."
        return masked

    def save_model(self, request, obj, form, change):
        from alkemy.errors import AlkemyError
        from alkemy.tenancy.services import tenant_set_gemini_key

        super().save_model(request, obj, form, change)
        new_key = form.cleaned_data.get("gemini_api_key")
        if form.cleaned_data.get("clear_gemini_api_key"):
            tenant_set_gemini_key(tenant=obj, api_key="")
        elif new_key:
            try:
                tenant_set_gemini_key(tenant=obj, api_key=new_key)
            except AlkemyError as exc:
                messages.error(request, exc.message)

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

    def delete_model(self, request, obj):
        tenant_delete(tenant=obj)  # everything it owns, and its media folder after commit

    def delete_queryset(self, request, queryset):
        for tenant in queryset:
            tenant_delete(tenant=tenant)


@admin.register(Membership)
class MembershipAdmin(TenantScopedAdmin):
    list_display = ["user", "tenant", "role", "created_at"]
    list_filter = ["role", TENANT_FILTER]
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
        if obj is not None or not request.user.is_superuser:
            return ["user", "tenant"]  # a membership is one user in one tenant; change only its role
        return []


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    manage_only = True  # keys are credentials: owners and admins only
    list_display = ["name", "tenant", "role", "display_prefix", "created_at", "last_used_at", "revoked_at"]
    list_filter = [TENANT_FILTER, "role", ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix", "tenant__slug"]
    readonly_fields = ["display_prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    fields = ["tenant", "name", "role", "display_prefix", "created_by", "created_at", "last_used_at", "revoked_at"]
    # Revocation is final (the "Revoke" action) and a key's power never grows: make a new key instead.
    immutable_fields = ("role",)
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
        queryset = self.editable_queryset(request, queryset)
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).")
