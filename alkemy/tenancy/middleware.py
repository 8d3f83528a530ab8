"""Opens the tenant scope for admin requests: a superuser sees every tenant, staff their own."""

from alkemy.tenancy import scoping
from alkemy.tenancy.models import Membership


def admin_tenant_ids(user) -> frozenset[int]:
    return frozenset(Membership.objects.unscoped().filter(user=user).values_list("tenant_id", flat=True))


class AdminTenantScopeMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        user = getattr(request, "user", None)
        if not request.path.startswith("/admin/") or user is None or not user.is_authenticated:
            return self.get_response(request)
        if user.is_superuser:
            with scoping.all_tenants():
                return self.get_response(request)
        with scoping.tenant_scope(admin_tenant_ids(user)):
            return self.get_response(request)
