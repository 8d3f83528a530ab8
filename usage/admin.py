"""Admin: price books (operators), budgets, the read-only ledger, and the usage page with its chart and CSV.

Price books are the operator's: only superusers see and change them, and a version that priced an event
is read-only ("New version from this one" copies it). Budgets are set by operators; a studio's staff see
theirs. The ledger and reservations can be looked at, never added, changed or deleted.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Max
from django.http import HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin, _roles_by_tenant
from alkemy.tenancy.models import Tenant
from usage import reports
from usage.charts import daily_cost_svg
from usage.models import PRICE_UNITS, Budget, PriceBook, PriceRate, Reservation, UsageEvent
from usage.money import cents, exact
from usage.selectors import month_bounds, month_of
from usage.services import price_book_new_version


class SuperuserOnlyMixin:
    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser

    def has_add_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser


class PriceRateInline(SuperuserOnlyMixin, admin.TabularInline):
    model = PriceRate
    extra = 0
    fields = ["meter", "gpu_class", "price", "price_unit", "per_meter_unit"]
    readonly_fields = ["price_unit", "per_meter_unit"]

    def has_add_permission(self, request, obj=None):
        return super().has_add_permission(request) and (obj is None or not obj.is_used)

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser and (obj is None or not obj.is_used)

    def has_delete_permission(self, request, obj=None):
        return self.has_change_permission(request, obj)

    @admin.display(description="Price unit")
    def price_unit(self, rate):
        return PRICE_UNITS[rate.meter][1] if rate.meter else ""

    @admin.display(description="USD per meter unit")
    def per_meter_unit(self, rate):
        return f"{rate.unit_price:f}" if rate.pk else ""


@admin.register(PriceBook)
class PriceBookAdmin(SuperuserOnlyMixin, admin.ModelAdmin):
    list_display = ["name", "owner", "version", "effective_from", "used"]
    list_filter = [("tenant", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["name", "tenant__slug"]
    inlines = [PriceRateInline]
    actions = ["new_version"]

    def get_fields(self, request, obj=None):
        return ["name", "tenant", "version", "effective_from", "source"] if obj else [
            "name", "tenant", "effective_from", "source"]  # fmt: skip

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        return ["name", "tenant", "version", "effective_from", "source"] if obj.is_used else ["tenant", "version"]

    def has_change_permission(self, request, obj=None):
        # a used version is frozen: the page shows it read-only
        return request.user.is_superuser and (obj is None or not obj.is_used)

    def has_delete_permission(self, request, obj=None):
        return self.has_change_permission(request, obj)

    def save_model(self, request, obj, form, change):
        if not change:
            obj.version = (PriceBook.objects.filter(tenant=obj.tenant).aggregate(v=Max("version"))["v"] or 0) + 1
        super().save_model(request, obj, form, change)

    @admin.display(description="Tenant")
    def owner(self, book):
        return book.tenant.slug if book.tenant_id else "default"

    @admin.display(description="Used", boolean=True)
    def used(self, book):
        return book.is_used

    @admin.action(description="New version from this one (effective now, editable until used)")
    def new_version(self, request, queryset):
        for book in queryset:
            fresh = price_book_new_version(based_on=book, effective_from=timezone.now())
            messages.info(request, f"Created {fresh}.")


@admin.register(Budget)
class BudgetAdmin(TenantScopedAdmin):
    list_display = ["tenant", "monthly_limit", "limit_kind", "max_concurrent_jobs", "max_queued_jobs", "updated_at"]
    fields = ["tenant", "monthly_limit", "limit_kind", "max_concurrent_jobs", "max_queued_jobs", "method_limits"]
    list_filter = ["limit_kind", TENANT_FILTER]
    search_fields = ["tenant__slug", "tenant__name"]

    def get_readonly_fields(self, request, obj=None):
        return ["tenant"] if obj else []  # a budget never moves to another tenant

    # operators set budgets; a studio's staff see theirs
    def has_add_permission(self, request):
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None):
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser


class ReadOnlyTenantAdmin(TenantScopedAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyTenantAdmin):
    list_display = ["job_kind", "job_id", "tenant", "method", "gpu_class", "estimated_device_seconds",
                    "estimated_cost", "over_soft_limit", "created_at"]  # fmt: skip
    list_filter = ["job_kind", "method", "over_soft_limit", TENANT_FILTER]
    search_fields = ["=job_id", "method"]
    date_hierarchy = "created_at"


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyTenantAdmin):
    change_list_template = "admin/usage/usageevent/change_list.html"
    list_display = ["occurred_at", "tenant", "job", "meter", "gpu_class", "quantity", "unit_price", "cost",
                    "billable", "reason"]  # fmt: skip
    list_filter = ["meter", "billable", "job_kind", "method", TENANT_FILTER]
    search_fields = ["=job_id", "idempotency_key", "character_name"]
    date_hierarchy = "occurred_at"

    @admin.display(description="Job")
    def job(self, event):
        if event.job_kind == "generation" and event.job_id:
            url = reverse("admin:generation_generationjob_change", args=[event.job_id])
            return format_html('<a href="{}">generation #{}</a> (attempt {})', url, event.job_id, event.attempt)
        return f"{event.job_kind} #{event.job_id}" if event.job_id else event.job_kind

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("report/", wrap(self.report_view), name="usage_report"),
            path("report.csv", wrap(self.report_csv), name="usage_report_csv"),
            *super().get_urls(),
        ]

    def _visible_tenants(self, request):
        tenants = Tenant.objects.order_by("slug")
        return tenants if request.user.is_superuser else tenants.filter(pk__in=list(_roles_by_tenant(request)))

    def _report_args(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        tenants = list(self._visible_tenants(request))
        wanted = request.GET.get("tenant")
        chosen = next((t for t in tenants if str(t.pk) == wanted or t.slug == wanted), tenants[0] if tenants else None)
        try:
            start, end = month_of(request.GET["month"]) if request.GET.get("month") else month_bounds()
        except (ValueError, KeyError):
            start, end = month_bounds()
        return tenants, chosen, start, end

    def report_view(self, request):
        tenants, tenant, start, end = self._report_args(request)
        report = reports.statement(tenant=tenant, start=start, end=end) if tenant else None
        context = {
            **self.admin_site.each_context(request),
            "title": "Usage and cost",
            "opts": self.model._meta,
            "tenants": tenants,
            "tenant": tenant,
            "month": f"{start:%Y-%m}",
            "report": report,
            "lines": [{**line, "cost": exact(line["cost"]), "unit_price": f"{line['unit_price'].normalize():f}"}
                      for line in (report.lines if report else [])],  # fmt: skip
            "total": exact(report.total) if report else None,
            "total_usd": cents(report.total) if report else None,
            "unbilled": exact(report.unbilled) if report else None,
            "chart": mark_safe(daily_cost_svg(report.days, title=f"Daily cost, {tenant.slug}, {start:%Y-%m}"))  # noqa: S308  numbers and escaped text only
            if report else "",
        }  # fmt: skip
        return TemplateResponse(request, "admin/usage/report.html", context)

    def report_csv(self, request):
        _, tenant, start, end = self._report_args(request)
        body = reports.events_csv(tenants=[tenant] if tenant else [], start=start, end=end)
        response = HttpResponse(body, content_type="text/csv")
        name = f"usage-{tenant.slug if tenant else 'none'}-{start:%Y-%m}.csv"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
