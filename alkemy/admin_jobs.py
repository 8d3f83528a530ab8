"""Live job status in admin: the job changelists and change pages follow a job without a manual reload.

Every job admin (generations, trainings) mixes in `LiveJobStatusAdmin`. Its status and progress cells
carry `data-job-id`; `alkemy/job_status.js` polls the admin's `status.json` for the jobs on the page
that are not finished yet and rewrites those cells. On a change page, a job that finishes reloads the
page once, so its outputs, scores and cost appear. The JSON view reads through `get_queryset`, so a
user only ever learns the status of jobs of their own tenants.
"""

from __future__ import annotations

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.urls import path, reverse
from django.utils.html import format_html

from alkemy.jobs import TERMINAL

#: at most this many jobs per poll (a changelist page shows 100)
MAX_POLLED_JOBS = 200


def progress_label(job) -> str:
    steps = f" (step {job.current_step}/{job.total_steps})" if job.total_steps and job.status == "running" else ""
    return f"{job.progress * 100:.0f}%{steps}"


class LiveJobStatusAdmin(admin.ModelAdmin):
    """Status and progress cells that update themselves; use `live_status` and `live_progress` as fields."""

    class Media:
        js = ["alkemy/job_status.js"]

    def _status_url(self) -> str:
        opts = self.model._meta
        return reverse(f"admin:{opts.app_label}_{opts.model_name}_status")

    def live_state(self, obj) -> dict:
        """What the cells and `status.json` say about a row: status, progress, label and whether it is
        finished (polling stops); a job-like row that is not a `Job` (a shot list) overrides it."""
        return {"status": obj.status, "progress": obj.progress, "label": progress_label(obj),
                "terminal": obj.status in TERMINAL}  # fmt: skip

    def _live_cell(self, obj, kind: str):
        state = self.live_state(obj)
        return format_html(
            '<span class="job-live job-{}" data-job-{}="{}" data-job-status-url="{}" data-job-state="{}" '
            'data-job-done="{}">{}</span>',
            kind, kind, obj.pk, self._status_url(), state["status"], "1" if state["terminal"] else "0",
            state["status"] if kind == "status" else state["label"],
        )  # fmt: skip

    @admin.display(description="Status", ordering="status")
    def live_status(self, obj):
        return self._live_cell(obj, "status")

    @admin.display(description="Progress", ordering="progress")
    def live_progress(self, obj):
        return self._live_cell(obj, "progress")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # a job's page is its record: nothing on it is editable, so it offers no Save buttons
        extra_context = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False,
                         "show_save_and_add_another": False}  # fmt: skip
        return super().change_view(request, object_id, form_url, extra_context)

    def get_urls(self):
        opts = self.model._meta
        view = self.admin_site.admin_view(self.status_view)
        return [path("status.json", view, name=f"{opts.app_label}_{opts.model_name}_status"), *super().get_urls()]

    def status_view(self, request):
        """`?ids=1,2,3` → `{"jobs": {"1": {"status", "progress", "label", "terminal"}}}`; unknown ids and other
        tenants' jobs are simply absent."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        ids = [int(part) for part in request.GET.get("ids", "").split(",") if part.strip().isdigit()]
        jobs = self.get_queryset(request).filter(pk__in=ids[:MAX_POLLED_JOBS]) if ids else []
        return JsonResponse(
            {
                "jobs": {str(job.pk): self.live_state(job) for job in jobs}
            }
        )  # admin_view adds no-store: a poll always reads the row
