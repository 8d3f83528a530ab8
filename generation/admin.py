from django.contrib import admin, messages
from django.http import FileResponse, Http404
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from alkemy.admin_jobs import LiveJobStatusAdmin
from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus
from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin, TenantScopedInline
from generation.jobs import generation_cancel, generation_job_delete
from generation.models import GeneratedImage, GenerationJob


class GeneratedImageInline(TenantScopedInline, admin.TabularInline):
    model = GeneratedImage
    extra = 0
    can_delete = False
    fields = ["preview", "seed", "width", "height", "identity_similarity", "identity_reason"]
    readonly_fields = fields

    def get_queryset(self, request):
        return GeneratedImage.objects.unscoped()

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="Image")
    def preview(self, obj):
        url = reverse("admin:generation_output_image", args=[obj.pk])
        return format_html('<a href="{0}"><img src="{0}" alt="" style="max-height:160px"></a>', url)


@admin.register(GenerationJob)
class GenerationJobAdmin(LiveJobStatusAdmin, TenantScopedAdmin):
    list_display = ["id", "character", "method", "live_status", "live_progress", "attempt", "tenant", "queued_at",
                    "device_seconds"]  # fmt: skip
    list_filter = ["status", "method", "error_code", TENANT_FILTER]
    search_fields = ["=id", "prompt", "character__name", "character__slug", "idempotency_key"]
    date_hierarchy = "queued_at"
    # nothing of a job is edited by hand: the request is what was validated, the rest is the worker's record
    readonly_fields = [f.name for f in GenerationJob._meta.fields] + [
        "live_status", "live_progress", "queue_wait_seconds", "run_seconds", "cost",
    ]  # fmt: skip
    fieldsets = [
        ("Status", {"fields": ["live_status", "live_progress", ("current_step", "total_steps"), "cancel_requested",
                               ("error_code", "error_message"), "error_details"]}),
        ("Request", {"fields": ["tenant", "character", "method", "prompt", "negative_prompt", ("width", "height"),
                                ("steps", "guidance", "seed", "num_images"), "params", ("lora", "style_lora"),
                                ("requested_by", "requested_by_api_key"), "idempotency_key"]}),
        ("Run", {"fields": [("queued_at", "started_at", "finished_at"), ("queue_wait_seconds", "run_seconds"),
                            ("device", "device_seconds"), "usage", "cost", "embedder"]}),
        ("Worker and lease", {"classes": ["collapse"],
                              "fields": ["attempt", "worker", "lease_expires_at", "heartbeat_at", "request_hash"]}),
    ]  # fmt: skip
    inlines = [GeneratedImageInline]
    actions = ["cancel"]

    def has_add_permission(self, request):
        return False  # submitted through the API, which validates and enqueues

    @admin.display(description="Cost (USD)")
    def cost(self, obj):
        from usage.selectors import job_cost

        cost = job_cost(job_kind="generation", job_id=obj.pk, tenant_id=obj.tenant_id)
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((e["meter"], e["gpu_class"] or "", e["quantity"], e["cost"], "billed" if e["billable"] else
              f"not billed ({e['reason']})") for e in cost["events"]),
        )  # fmt: skip
        estimate = f"estimated {cost['estimated']}; " if cost["estimated"] else ""
        total = f"billed {cost['total']} (${cost['total_usd']})"
        return format_html("<p>{}{}</p><table>{}</table>", estimate, total, rows)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            return False  # cancel first: a worker may be writing its outputs
        return super().has_delete_permission(request, obj)

    def delete_model(self, request, obj):
        generation_job_delete(job=obj)  # outputs' files go after commit

    def delete_queryset(self, request, queryset):
        for job in self.editable_queryset(request, queryset):
            try:
                generation_job_delete(job=job)
            except AlkemyError as exc:
                messages.error(request, f"Generation #{job.pk}: not deleted — {exc.message}")

    @admin.action(description="Cancel selected jobs", permissions=["change"])
    def cancel(self, request, queryset):
        queryset = self.editable_queryset(request, queryset)  # not the tenants where the user only views
        for job in queryset:
            generation_cancel(job=job)
        messages.info(request, f"Cancel requested for {queryset.count()} job(s).")

    def get_urls(self):
        view = self.admin_site.admin_view(self.output_image)
        return [path("outputs/<int:output_id>/image.png", view, name="generation_output_image"), *super().get_urls()]

    def output_image(self, request, output_id: int):
        # The admin middleware's scope limits this to the user's tenants.
        output = GeneratedImage.objects.filter(pk=output_id).first()
        if output is None:
            raise Http404("No such output.")
        return FileResponse(output.file.open("rb"), content_type="image/png")
