"""The tenant's own usage: totals grouped by method, day, meter or character; its budget; its ledger."""

from __future__ import annotations

from datetime import date

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from alkemy.api.base import TenantAPIView, TenantViewSet
from alkemy.errors import AlkemyError
from usage import selectors
from usage.errors import TooManyJobs
from usage.models import UsageEvent


class RetryAfterMixin:
    """Sends `Retry-After` with a 429 `too_many_jobs` (any view that admits jobs uses it)."""

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        if isinstance(exc, TooManyJobs):
            response["Retry-After"] = str(exc.retry_after)
        return response


def _period(params) -> tuple:
    today = timezone.now().date()
    try:
        first = selectors.parse_day(params.get("from"), today.replace(day=1))
    except ValueError:
        raise AlkemyError("from must be a date, YYYY-MM-DD.", code="invalid_parameter", field="from") from None
    try:
        last = selectors.parse_day(params.get("to"), today)
    except ValueError:
        raise AlkemyError("to must be a date, YYYY-MM-DD.", code="invalid_parameter", field="to") from None
    if last < first:
        raise AlkemyError("to must not be before from.", code="invalid_parameter", field="to")
    if last.toordinal() - first.toordinal() > 3660:
        raise AlkemyError("The period may span at most ten years.", code="invalid_parameter", field="to")
    return selectors.day_bounds(first, last)


class UsageView(TenantAPIView):
    @extend_schema(
        summary="The tenant's usage and cost in a period, grouped",
        parameters=[
            OpenApiParameter("from", date, description="First day (UTC), included; default: the 1st of this month"),
            OpenApiParameter("to", date, description="Last day (UTC), included; default: today"),
            OpenApiParameter("group_by", str, enum=list(selectors.GROUP_BY), description="Default: method"),
        ],
        responses=OpenApiTypes.OBJECT,
    )
    def get(self, request):
        group_by = request.query_params.get("group_by") or "method"
        if group_by not in selectors.GROUP_BY:
            raise AlkemyError(
                f"group_by must be one of {', '.join(selectors.GROUP_BY)}.", code="invalid_parameter", field="group_by"
            )
        start, end = _period(request.query_params)
        return Response(selectors.usage_summary(tenant_id=self.tenant.pk, start=start, end=end, group_by=group_by))


class BudgetView(TenantAPIView):
    @extend_schema(
        summary="The tenant's budget this month: limit, spent, reserved, remaining", responses=OpenApiTypes.OBJECT
    )
    def get(self, request):
        return Response(selectors.budget_status(tenant_id=self.tenant.pk))


class UsageEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = UsageEvent
        fields = ["id", "occurred_at", "job_kind", "job_id", "attempt", "method", "character_id", "meter",
                  "gpu_class", "quantity", "unit_price", "cost", "billable", "reason", "job_status", "price_book"]
        read_only_fields = fields  # fmt: skip


class UsageEventViewSet(TenantViewSet):
    """The tenant's ledger, newest first (`?from=&to=` as for the totals, `?meter=`, `?job_kind=&job_id=`)."""

    serializer_class = UsageEventSerializer

    def tenant_queryset(self):
        start, end = _period(self.request.query_params)
        events = UsageEvent.objects.filter(tenant=self.tenant, occurred_at__gte=start, occurred_at__lt=end)
        for name in ("meter", "job_kind", "job_id"):
            value = self.request.query_params.get(name)
            if not value:
                continue
            if name == "job_id" and not value.isdigit():
                raise AlkemyError("job_id must be a number.", code="invalid_parameter", field="job_id")
            events = events.filter(**{name: value})
        return events.order_by("-occurred_at", "-id")

    def filter_queryset(self, queryset):
        return queryset  # the filters above; no search or ordering parameters

    @extend_schema(summary="The tenant's usage events (the ledger)")
    def list(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(self.get_serializer(page, many=True).data)
