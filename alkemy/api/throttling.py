"""Request rate limits per API key and per tenant: 429 `rate_limited` with `Retry-After`.

Every tenant API request (`alkemy.api.base.TenantScopedMixin`, once its tenant is known) takes one
token from its caller's bucket (`key:<id>`, or `user:<id>` for a session user) and one from its
tenant's (`tenant:<id>`). The buckets live in PostgreSQL (`alkemy.ratelimit`), so every gunicorn worker
and every web machine counts against the same numbers. A bucket holds a minute's allowance and refills
continuously: `ALKEMY_RATE_LIMIT_PER_KEY` requests a minute per key (or user), `ALKEMY_RATE_LIMIT_PER_TENANT`
for all of a tenant's keys and users together; 0 turns a limit off. Unauthenticated requests are
refused (401) before they count; the public health check is not limited here (limit by IP at the
reverse proxy).
"""

from __future__ import annotations

from django.conf import settings
from rest_framework import exceptions

from alkemy import ratelimit
from alkemy.tenancy.authentication import ApiKeyPrincipal

PERIOD_SECONDS = 60.0


class RateLimited(exceptions.Throttled):
    """429 `rate_limited` (see alkemy/api/errors.py); DRF's handler sets `Retry-After` from `wait`."""

    def __init__(self, *, scope: str, limit: int, wait: int) -> None:
        who = "API key" if scope == "key" else ("user" if scope == "user" else "tenant")
        super().__init__(
            wait=wait,
            detail=f"Too many requests for this {who}: at most {limit} a minute. Retry in {wait} s.",
        )
        self.extra_details = {"scope": scope, "limit_per_minute": limit}


def request_limits(*, principal, tenant) -> list[ratelimit.Limit]:
    per_key = settings.ALKEMY_RATE_LIMIT_PER_KEY
    per_tenant = settings.ALKEMY_RATE_LIMIT_PER_TENANT
    caller = f"key:{principal.api_key.pk}" if isinstance(principal, ApiKeyPrincipal) else f"user:{principal.pk}"
    return [
        ratelimit.Limit(caller, per_key, PERIOD_SECONDS),
        ratelimit.Limit(f"tenant:{tenant.pk}", per_tenant, PERIOD_SECONDS),
    ]


def check_request_rate(*, principal, tenant) -> None:
    """Count one request of `principal` in `tenant`; RateLimited when a limit is used up."""
    limits = request_limits(principal=principal, tenant=tenant)
    refusals = ratelimit.take(limits)
    if not refusals:
        return
    refusal = max(refusals, key=lambda r: r.retry_after)
    scope = refusal.bucket.split(":", 1)[0]
    limit = next(limit for limit in limits if limit.bucket == refusal.bucket)
    raise RateLimited(scope=scope, limit=int(limit.capacity), wait=refusal.retry_after)
