"""Shot lists in admin: created from a character page (one prompt per line), progress, the contact sheet
inline, the report table, cancel and re-roll of outliers. Every write goes through `shotlists.services`."""

from django import forms
from django.contrib import admin, messages
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from alkemy.admin_jobs import LiveJobStatusAdmin
from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus
from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin
from generation.methods import DEFAULT_METHOD, METHODS
from shotlists import services
from shotlists.contact_sheet import render_contact_sheet
from shotlists.models import ShotJob, ShotList
from shotlists.report import report_csv, shotlist_report
from shotlists.selectors import shotlist_progress


class ShotListForm(forms.Form):
    """What `POST /api/v1/shotlists` takes, for staff: the prompts one per line, shared render settings."""

    name = forms.CharField(max_length=200)
    prompts = forms.CharField(widget=forms.Textarea(attrs={"rows": 8, "cols": 80}), help_text="One shot per line")
    other_characters = forms.ModelMultipleChoiceField(
        queryset=None, required=False, help_text="Render these characters across the same shots too"
    )
    methods = forms.MultipleChoiceField(choices=[(m, m) for m in METHODS], initial=[DEFAULT_METHOD],
                                        widget=forms.CheckboxSelectMultiple)  # fmt: skip
    negative_prompt = forms.CharField(required=False, max_length=4000)
    width = forms.IntegerField(initial=1024)
    height = forms.IntegerField(initial=1024)
    steps = forms.IntegerField(required=False, help_text="Empty: each method's default")
    images_per_shot = forms.IntegerField(initial=1, min_value=1)

    def __init__(self, *args, others, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["other_characters"].queryset = others

    def shots(self) -> list[services.ShotSpec]:
        data = self.cleaned_data
        lines = [line.strip() for line in data["prompts"].splitlines() if line.strip()]
        return [
            services.ShotSpec(
                prompt=line,
                negative_prompt=data["negative_prompt"],
                width=data["width"],
                height=data["height"],
                steps=data["steps"],
            )  # fmt: skip
            for line in lines
        ]


@admin.register(ShotList)
class ShotListAdmin(LiveJobStatusAdmin, TenantScopedAdmin):
    list_display = ["id", "name", "tenant", "live_status", "live_progress", "job_count", "methods", "created_at"]
    list_filter = [TENANT_FILTER]
    search_fields = ["=id", "name", "idempotency_key"]
    date_hierarchy = "created_at"
    readonly_fields = ["name", "tenant", "methods", "images_per_shot", "character_ids", "live_status", "live_progress",
                       "contact_sheet", "report_table", "job_links", "created_at"]  # fmt: skip
    fields = readonly_fields
    actions = ["cancel", "reroll_outliers"]

    def has_add_permission(self, request):
        return False  # from a character page ("Shot list…") or the API, which validate and enqueue

    def has_delete_permission(self, request, obj=None):
        return False  # the jobs are generation jobs: deleted (after finishing) from their own pages

    def _progress(self, obj) -> dict:
        if not hasattr(obj, "_progress"):  # three columns read it: one query per row
            obj._progress = shotlist_progress(shot_list=obj)
        return obj._progress

    def live_state(self, obj) -> dict:
        """A shot list's status and progress come from its jobs (the status and progress cells poll them)."""
        progress = self._progress(obj)
        counts = ", ".join(f"{n} {status}" for status, n in progress["jobs_by_status"].items() if n)
        label = f"{progress['progress'] * 100:.0f}% ({counts})"
        status = str(progress["status"])
        return {"status": status, "progress": progress["progress"], "label": label,
                "terminal": status not in (JobStatus.QUEUED, JobStatus.RUNNING)}  # fmt: skip

    @admin.display(description="Status")
    def live_status(self, obj):
        return self._live_cell(obj, "status")

    @admin.display(description="Progress")
    def live_progress(self, obj):
        return self._live_cell(obj, "progress")

    @admin.display(description="Jobs")
    def job_count(self, obj):
        return self._progress(obj)["jobs_total"]

    @admin.display(description="Contact sheet")
    def contact_sheet(self, obj):
        url = reverse("admin:shotlists_shotlist_contact_sheet", args=[obj.pk])
        return format_html('<a href="{0}"><img src="{0}" alt="contact sheet" style="max-width:100%"></a>', url)

    @admin.display(description="Consistency report")
    def report_table(self, obj):
        report = shotlist_report(shot_list=obj)

        def number(value, digits=3):
            return "—" if value is None else f"{value:.{digits}f}"

        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    row["character"]["name"] if row["character"] else "?",
                    row["method"],
                    row["outputs"],
                    number(row["identity"]["mean"]),
                    number(row["identity"]["min"]),
                    number(row["identity"]["p10"]),
                    number(row["consistency"]["mean"]),
                    number(row["consistency"]["min"]),
                    number(row["same_person_share"], 2),
                    ", ".join(f"shot {o['shot']} ({o['identity_similarity'] or o['reason']})" for o in row["outliers"])
                    or "—",
                    f"{number(row['seconds_per_image']['p50'], 2)} / {number(row['seconds_per_image']['p90'], 2)}",
                    "; ".join(f"shot {e['shot']}: {e['code']}" for e in row["errors"]) or "—",
                )  # fmt: skip
                for row in report["rows"]
            ),
        )
        csv_url = reverse("admin:shotlists_shotlist_report_csv", args=[obj.pk])
        return format_html(
            "<table><thead><tr><th>Character</th><th>Method</th><th>Outputs</th><th>Identity mean</th><th>min</th>"
            "<th>p10</th><th>Consistency mean</th><th>min</th><th>Same person</th><th>Outliers</th>"
            "<th>s/image p50 / p90</th><th>Errors</th></tr></thead><tbody>{}</tbody></table>"
            '<p>Same-person threshold {} ({}). <a href="{}">Download CSV</a></p>',
            rows, report["same_person_threshold"] or "—", report["embedder"] or "no embedder", csv_url,
        )  # fmt: skip

    @admin.display(description="Jobs")
    def job_links(self, obj):
        from shotlists.selectors import shotlist_jobs

        return format_html_join(
            ", ",
            '<a href="{}">#{}</a> {} {} shot {} ({})',
            (
                (
                    reverse("admin:generation_generationjob_change", args=[link.job_id]),
                    link.job_id,
                    link.character.name,
                    link.method,
                    link.shot.index,
                    link.job.status,
                )  # fmt: skip
                for link in shotlist_jobs(shot_list=obj)
            ),
        )

    @admin.action(description="Cancel the unfinished jobs of the selected shot lists", permissions=["change"])
    def cancel(self, request, queryset):
        total = sum(services.shotlist_cancel(shot_list=s) for s in self.editable_queryset(request, queryset))
        messages.info(request, f"Cancel requested for {total} job(s).")

    @admin.action(description="Re-roll the outliers of the selected shot lists (new seeds)", permissions=["change"])
    def reroll_outliers(self, request, queryset):
        for shot_list in self.editable_queryset(request, queryset):
            try:
                jobs = services.shotlist_reroll(shot_list=shot_list)
            except AlkemyError as exc:
                messages.error(request, f"{shot_list}: {exc.message} ({exc.code})")
            else:
                messages.success(request, f"{shot_list}: {len(jobs)} re-roll job(s) queued.")

    def get_urls(self):
        return [
            path("new/<int:character_id>/", self.admin_site.admin_view(self.create_view),
                 name="shotlists_shotlist_new"),
            path("<int:shot_list_id>/contact-sheet.png", self.admin_site.admin_view(self.contact_sheet_view),
                 name="shotlists_shotlist_contact_sheet"),
            path("<int:shot_list_id>/report.csv", self.admin_site.admin_view(self.report_csv_view),
                 name="shotlists_shotlist_report_csv"),
            *super().get_urls(),
        ]  # fmt: skip

    def _shot_list(self, request, shot_list_id: int) -> ShotList:
        shot_list = self.get_queryset(request).filter(pk=shot_list_id).first()  # only the user's tenants
        if shot_list is None:
            raise Http404("No such shot list.")
        return shot_list

    def contact_sheet_view(self, request, shot_list_id: int):
        shot_list = self._shot_list(request, shot_list_id)
        png = render_contact_sheet(shot_list=shot_list, report=shotlist_report(shot_list=shot_list))
        return HttpResponse(png, content_type="image/png")

    def report_csv_view(self, request, shot_list_id: int):
        shot_list = self._shot_list(request, shot_list_id)
        response = HttpResponse(report_csv(shotlist_report(shot_list=shot_list)), content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="shotlist-{shot_list.pk}-report.csv"'
        return response

    def create_view(self, request, character_id: int):
        """The character page's "Shot list…": the same service as the API."""
        from characters.models import Character

        character = Character.objects.unscoped().filter(pk=character_id).first()
        character_admin = self.admin_site._registry.get(Character)
        if (
            character is None
            or character_admin is None
            or not character_admin.has_change_permission(request, character)
        ):
            raise Http404("No such character.")
        others = Character.objects.unscoped().filter(tenant_id=character.tenant_id).exclude(pk=character.pk)
        form = ShotListForm(request.POST or None, others=others.order_by("name"),
                            initial={"name": f"{character.name} storyboard"})  # fmt: skip
        error = None
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                shot_list, _ = services.shotlist_submit(
                    tenant=character.tenant, name=data["name"], characters=[character, *data["other_characters"]],
                    methods=data["methods"], shots=form.shots(), images_per_shot=data["images_per_shot"],
                    requested_by=request.user,
                )  # fmt: skip
            except AlkemyError as exc:
                error = f"{exc.message} ({exc.code})"
            else:
                count = ShotJob.objects.unscoped().filter(shot_list=shot_list).count()
                messages.success(request, f"Shot list #{shot_list.pk} queued: {count} jobs.")
                return redirect("admin:shotlists_shotlist_change", shot_list.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Shot list for {character.name}",
            "opts": self.model._meta,
            "character": character,
            "form": form,
            "error": error,
        }
        return TemplateResponse(request, "admin/shotlists/shotlist/new.html", context)
