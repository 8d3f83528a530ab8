"""The one place where an API request gets its tenant.

Every tenant-owned endpoint derives from `TenantViewSet` / `TenantAPIView`. Before any handler
runs, the tenant and the caller's role are resolved (API key → its tenant; a session user →
their membership, picked with the `X-Alkemy-Tenant` header when they have several), the
fail-closed manager scope is opened for the request, and writes are refused for viewers.
Handlers use `self.tenant`; `get_queryset` filters by it explicitly as well.
"""

from __future__ import annotations

from rest_framework import exceptions, mixins, viewsets
from rest_framework.permissions import SAFE_METHODS
from rest_framework.views import APIView

from alkemy.api.throttling import check_request_rate
from alkemy.logging import bind as bind_log_context
from alkemy.tenancy import scoping
from alkemy.tenancy.authentication import ApiKeyPrincipal
from alkemy.tenancy.models import WRITE_ROLES, Membership, Tenant

TENANT_HEADER = "HTTP_X_ALKEMY_TENANT"


class TenantRequired(exceptions.PermissionDenied):
    default_code = "tenant_required"


def resolve_request_tenant(request) -> tuple[Tenant, str]:
    """(tenant, role) of an authenticated request, or PermissionDenied. Never 'all tenants'."""
    user = request.user
    if isinstance(user, ApiKeyPrincipal):
        return user.tenant, user.api_key.role

    wanted = request.META.get(TENANT_HEADER, "").strip()
    memberships = Membership.objects.unscoped().select_related("tenant").filter(user=user, tenant__is_active=True)
    if wanted:
        memberships = memberships.filter(tenant__slug=wanted)
    memberships = list(memberships[:2])
    if len(memberships) == 1:
        return memberships[0].tenant, memberships[0].role
    if wanted and user.is_superuser:
        tenant = Tenant.objects.filter(slug=wanted, is_active=True).first()
        if tenant:
            return tenant, "owner"
    if not memberships:
        raise TenantRequired(
            "You are not a member of that tenant." if wanted else "You are not a member of any tenant."
        )
    raise TenantRequired("You belong to several tenants: name one in the X-Alkemy-Tenant header.")


class ReadOnlyRole(exceptions.PermissionDenied):
    default_code = "read_only_role"
    default_detail = "Your role in this tenant is read-only."


class TenantScopedMixin:
    """Resolves tenant + role once per request and holds the manager scope open while it runs."""

    #: roles allowed to use unsafe methods on this endpoint
    write_roles = WRITE_ROLES

    tenant: Tenant
    role: str

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular building the schema: no tenant
            return self.get_serializer_class().Meta.model._base_manager.none()
        return self.tenant_queryset()

    def tenant_queryset(self):
        """The endpoint's rows of `self.tenant` (subclasses implement it through a selector)."""
        raise NotImplementedError

    def dispatch(self, request, *args, **kwargs):
        self._scope_token = None
        try:
            return super().dispatch(request, *args, **kwargs)
        finally:
            if self._scope_token is not None:
                scoping.deactivate(self._scope_token)

    def requester(self) -> dict:
        """Who asked, as job services record it: `requested_by` (a user) or `requested_by_api_key`."""
        from alkemy.tenancy.authentication import ApiKeyPrincipal

        principal = self.request.user
        if isinstance(principal, ApiKeyPrincipal):
            return {"requested_by": None, "requested_by_api_key": principal.api_key}
        return {"requested_by": principal, "requested_by_api_key": None}

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authentication, IsAuthenticated, throttles
        self.tenant, self.role = resolve_request_tenant(request)
        check_request_rate(principal=request.user, tenant=self.tenant)  # 429 rate_limited, per key and tenant
        self._scope_token = scoping.activate(self.tenant)
        bind_log_context(tenant=self.tenant.slug)  # every log line of the request names the tenant
        if request.method not in SAFE_METHODS and self.role not in self.write_roles:
            raise ReadOnlyRole()


class TenantAPIView(TenantScopedMixin, APIView):
    pass


class TenantViewSet(TenantScopedMixin, viewsets.GenericViewSet):
    """Subclasses implement `tenant_queryset()` from `self.tenant` (via a selector)."""


class TenantModelViewSet(
    TenantScopedMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    mixins.ListModelMixin,
    viewsets.GenericViewSet,
):
    pass
