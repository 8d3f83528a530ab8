"""The admin base class every tenant-owned ModelAdmin uses.

Superusers see everything. A staff user sees only rows of tenants they are a member of; the
membership role decides what they may do there (viewers only look). Django's per-model
permissions are not needed for studio staff: membership is the permission.
"""

from __future__ import annotations

from django.contrib import admin

from alkemy.tenancy.models import MANAGE_ROLES, WRITE_ROLES, Membership, Tenant


def _roles_by_tenant(request) -> dict[int, str]:
    if not request.user.is_authenticated or not request.user.is_active:
        return {}
    cache = getattr(request, "_alkemy_roles", None)
    if cache is None:
        cache = dict(Membership.objects.unscoped().filter(user=request.user).values_list("tenant_id", "role"))
        request._alkemy_roles = cache
    return cache


def writable_tenant_ids(request) -> set[int]:
    return {tid for tid, role in _roles_by_tenant(request).items() if role in WRITE_ROLES}


def managed_tenant_ids(request) -> set[int]:
    """Tenants where the user is owner or admin (API keys, webhooks, memberships)."""
    return {tid for tid, role in _roles_by_tenant(request).items() if role in MANAGE_ROLES}


#: a tenant filter that lists only the tenants present in the (already scoped) changelist
TENANT_FILTER = ("tenant", admin.RelatedOnlyFieldListFilter)


def is_tenant_owned(model) -> bool:
    return hasattr(model, "tenant_field") and hasattr(model.objects, "unscoped")


def tenant_consistent_form(form_class, *, row_tenant_id: int | None, allowed_tenant_ids: set[int] | None):
    """The admin form with every tenant-owned choice limited to the row's tenant (an existing row)
    or to the tenants the user may edit (a new row); the model's `clean()` checks the saved value."""

    class TenantConsistentForm(form_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for name, field in self.fields.items():
                queryset = getattr(field, "queryset", None)
                if name == "tenant" or queryset is None or not is_tenant_owned(queryset.model):
                    continue
                tenant_field = queryset.model.tenant_field
                if row_tenant_id is not None:
                    field.queryset = queryset.filter(**{tenant_field: row_tenant_id})
                elif allowed_tenant_ids is not None:
                    field.queryset = queryset.filter(**{f"{tenant_field}__in": allowed_tenant_ids})

    TenantConsistentForm.__name__ = form_class.__name__
    return TenantConsistentForm


class TenantScopedAdmin(admin.ModelAdmin):
    #: lookup from this model to its tenant id
    tenant_lookup = "tenant"
    #: who may add, change and delete: members and up by default; owners/admins for credentials
    manage_only = False
    #: rows only owners/admins may even see (webhook URLs are bearer secrets)
    visible_to_managers_only = False
    #: fields fixed once the row exists, besides `tenant` (a row never changes tenant)
    immutable_fields: tuple[str, ...] = ()

    def get_readonly_fields(self, request, obj=None):
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None:
            fixed = ("tenant", *self.immutable_fields) if self.tenant_lookup == "tenant" else self.immutable_fields
            fields += [name for name in fixed if name not in fields]
        return fields

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change, **kwargs)
        allowed = None if request.user.is_superuser else self._editable_tenant_ids(request)
        row_tenant = self._tenant_id_of(obj) if obj is not None else None
        return tenant_consistent_form(form, row_tenant_id=row_tenant, allowed_tenant_ids=allowed)

    def _editable_tenant_ids(self, request) -> set[int]:
        return managed_tenant_ids(request) if self.manage_only else writable_tenant_ids(request)

    def get_queryset(self, request):
        queryset = (
            self.model.objects.unscoped() if hasattr(self.model.objects, "unscoped") else super().get_queryset(request)
        )
        ordering = self.get_ordering(request)
        if ordering:
            queryset = queryset.order_by(*ordering)
        if request.user.is_superuser:
            return queryset
        return queryset.filter(**{f"{self.tenant_lookup}__in": list(self._visible_tenant_ids(request))})

    def _visible_tenant_ids(self, request) -> set[int]:
        return managed_tenant_ids(request) if self.visible_to_managers_only else set(_roles_by_tenant(request))

    def _tenant_id_of(self, obj) -> int | None:
        value = obj
        for part in self.tenant_lookup.split("__"):
            value = getattr(value, part, None)
            if value is None:
                return None
        return value.pk if isinstance(value, Tenant) else value

    def has_module_permission(self, request):
        return request.user.is_active and (request.user.is_superuser or bool(self._visible_tenant_ids(request)))

    def has_view_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        visible = self._visible_tenant_ids(request)
        return bool(visible) if obj is None else self._tenant_id_of(obj) in visible

    def has_add_permission(self, request):
        return request.user.is_superuser or bool(self._editable_tenant_ids(request))

    def has_change_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        editable = self._editable_tenant_ids(request)
        return bool(editable) if obj is None else self._tenant_id_of(obj) in editable

    def editable_queryset(self, request, queryset):
        """For bulk actions: only the rows of tenants where the user may change things."""
        if request.user.is_superuser:
            return queryset
        return queryset.filter(**{f"{self.tenant_lookup}__in": list(self._editable_tenant_ids(request))})

    def has_delete_permission(self, request, obj=None):
        return self.has_change_permission(request, obj)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if request.user.is_superuser:
            pass
        elif db_field.name == "tenant":
            kwargs["queryset"] = Tenant.objects.filter(pk__in=self._editable_tenant_ids(request))
        elif is_tenant_owned(db_field.related_model):
            # never a row of a tenant where the user only views
            model = db_field.related_model
            kwargs["queryset"] = model.objects.unscoped().filter(
                **{f"{model.tenant_field}__in": self._editable_tenant_ids(request)}
            )
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_changeform_initial_data(self, request):
        initial = super().get_changeform_initial_data(request)
        editable = self._editable_tenant_ids(request)
        if "tenant" not in initial and len(editable) == 1:
            initial["tenant"] = next(iter(editable))
        return initial


class TenantScopedInline:
    """Mixin for inlines of a TenantScopedAdmin: membership, not Django's model permissions,
    decides who may see them (the parent page is already limited to the user's tenants)."""

    def has_view_permission(self, request, obj=None):
        if request.user.is_superuser:
            return True
        roles = _roles_by_tenant(request)
        return bool(roles) if obj is None else getattr(obj, "tenant_id", None) in roles
