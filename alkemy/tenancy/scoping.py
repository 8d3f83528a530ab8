"""Fail-closed tenant scoping for tenant-owned models (defence in depth).

Every tenant-owned model uses `TenantScopedManager` as its default manager. Its querysets are
filtered to the tenants of the active scope; with no scope active it raises
`TenantScopeMissing` instead of returning every tenant's rows. Scopes are opened in exactly
three places: the API base view (one tenant, from the API key or membership), the admin
middleware (the staff user's tenants, or all for a superuser), and background tasks
(`tenant_scope(...)` around the task body). Code that truly needs every tenant says so with
`Model.objects.unscoped()` or `with all_tenants():`.

This is the safety net; services still take the tenant explicitly (`character_get(tenant=...)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from django.db import models


class TenantScopeMissing(RuntimeError):
    """A tenant-owned model was queried outside any tenant scope."""


@dataclass(frozen=True)
class Scope:
    tenant_ids: frozenset[int] | None  # None: every tenant (explicitly requested)


_active_scope: ContextVar[Scope | None] = ContextVar("alkemy_tenant_scope", default=None)


def _tenant_id(tenant) -> int:
    return tenant if isinstance(tenant, int) else tenant.pk


@contextmanager
def tenant_scope(tenants) -> Iterator[Scope]:
    """Scope tenant-owned queries to one tenant (object or id) or an iterable of them."""
    if isinstance(tenants, Iterable) and not isinstance(tenants, (str, bytes)):
        ids = frozenset(_tenant_id(t) for t in tenants)
    else:
        ids = frozenset([_tenant_id(tenants)])
    token = _active_scope.set(Scope(tenant_ids=ids))
    try:
        yield _active_scope.get()
    finally:
        _active_scope.reset(token)


@contextmanager
def all_tenants() -> Iterator[Scope]:
    """Explicitly lift the tenant filter (superusers in admin, operator commands, reapers)."""
    token = _active_scope.set(Scope(tenant_ids=None))
    try:
        yield _active_scope.get()
    finally:
        _active_scope.reset(token)


def activate(tenant):
    """Open a one-tenant scope without a `with` block; pass the token to `deactivate`."""
    return _active_scope.set(Scope(tenant_ids=frozenset([_tenant_id(tenant)])))


def deactivate(token) -> None:
    _active_scope.reset(token)


def active_scope() -> Scope | None:
    return _active_scope.get()


class TenantScopedManager(models.Manager):
    """Default manager of tenant-owned models: filters by the active scope, raises without one."""

    def get_queryset(self) -> models.QuerySet:
        scope = _active_scope.get()
        if scope is None:
            raise TenantScopeMissing(
                f"{self.model.__name__} queried outside a tenant scope; use tenant_scope(tenant), "
                f"all_tenants(), or {self.model.__name__}.objects.unscoped()."
            )
        queryset = super().get_queryset()
        if scope.tenant_ids is None:
            return queryset
        return queryset.filter(**{f"{self.model.tenant_field}__in": scope.tenant_ids})

    def none(self) -> models.QuerySet:
        """An empty queryset needs no scope (schema generators and filters ask for one)."""
        return super().get_queryset().none()

    def unscoped(self) -> models.QuerySet:
        """Every tenant's rows. Callers must filter by tenant themselves."""
        return super().get_queryset()


class TenantOwnedModel(models.Model):
    """Base for every model that belongs to exactly one tenant."""

    tenant_field = "tenant"

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="%(app_label)s_%(class)s_set")

    objects = TenantScopedManager()

    class Meta:
        abstract = True

    def clean(self) -> None:
        """A row may only point at rows of its own tenant (admin forms run this on save)."""
        from django.core.exceptions import ValidationError

        super().clean()
        own_tenant = getattr(self, "tenant_id", None)
        if own_tenant is None:
            return
        for field in self._meta.concrete_fields:
            related = field.related_model if field.is_relation else None
            if related is None or not issubclass(related, TenantOwnedModel):
                continue
            related_id = getattr(self, field.attname)
            if related_id is None:
                continue
            rows = related.objects.unscoped().filter(pk=related_id)
            other = rows.values_list(related.tenant_field, flat=True).first()
            if other is not None and other != own_tenant:
                # a non-field error: the field may be read-only (not in the form) in admin
                raise ValidationError(
                    f"The {field.verbose_name} belongs to another studio than this {self._meta.verbose_name}."
                )
