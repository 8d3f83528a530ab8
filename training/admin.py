from django import forms
from django.contrib import admin, messages
from django.http import FileResponse, Http404
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from alkemy.admin_jobs import LiveJobStatusAdmin
from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus
from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin
from training import services
from training.jobs import LR_SCHEDULES, training_cancel, training_submit
from training.models import BaseModel, LoraArtifact, StyleLora, TrainingJob


@admin.register(LoraArtifact)
class LoraArtifactAdmin(TenantScopedAdmin):
    list_display = ["character", "version", "base_model", "lora_format", "rank", "is_selected", "source", "created_at"]
    list_filter = ["base_model", "source", "is_selected", TENANT_FILTER]
    search_fields = ["character__name", "character__slug", "trigger_token", "sha256"]
    readonly_fields = ["file", "sha256", "file_size", "lora_format", "rank", "version", "source", "is_selected",
                       "metadata", "created_by", "created_at"]  # fmt: skip
    # a version belongs to one character of one tenant for good; its file was checked against its base
    immutable_fields = ("character", "base_model")
    actions = ["select_version"]

    def has_add_permission(self, request):
        return False  # uploaded through the API, which validates the file

    @admin.action(description="Use the selected version for generations", permissions=["change"])
    def select_version(self, request, queryset):
        queryset = self.editable_queryset(request, queryset)
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version.", level=messages.ERROR)
            return
        artifact = services.lora_select(artifact=queryset.get())
        self.message_user(request, f"{artifact} is now used for generations.")

    def delete_model(self, request, obj):
        services.lora_delete(artifact=obj)

    def delete_queryset(self, request, queryset):
        for artifact in self.editable_queryset(request, queryset):
            try:
                services.lora_delete(artifact=artifact)
            except AlkemyError as exc:
                self.message_user(request, f"{artifact}: not deleted — {exc.message}", level=messages.ERROR)

    def has_delete_permission(self, request, obj=None):
        if obj is not None and services.lora_in_use(artifact=obj):
            return False  # queued or running generations still need the file
        return super().has_delete_permission(request, obj)


@admin.register(StyleLora)
class StyleLoraAdmin(TenantScopedAdmin):
    list_display = ["name", "tenant", "base_model", "lora_format", "rank", "created_at"]
    list_filter = ["base_model", TENANT_FILTER]
    search_fields = ["name", "trigger_token", "sha256"]
    readonly_fields = ["file", "sha256", "file_size", "lora_format", "rank", "created_at"]
    immutable_fields = ("base_model",)

    def has_add_permission(self, request):
        return False

    def delete_model(self, request, obj):
        services.style_lora_delete(style=obj)

    def delete_queryset(self, request, queryset):
        for style in self.editable_queryset(request, queryset):
            services.style_lora_delete(style=style)


# --- LoRA training jobs --------------------------------------------------------------------------------------


class TrainForm(forms.Form):
    """The API's training request; `training_submit` validates the ranges and the references."""

    base_model = forms.ChoiceField(choices=BaseModel.choices, initial=BaseModel.SDXL)
    steps = forms.IntegerField(required=False, min_value=1, help_text="Empty: 1000")
    rank = forms.IntegerField(initial=16, min_value=1, max_value=128)
    alpha = forms.FloatField(required=False, help_text="Empty: the rank")
    learning_rate = forms.FloatField(required=False, help_text="Empty: 1e-4")
    lr_schedule = forms.ChoiceField(choices=[(s, s) for s in LR_SCHEDULES], initial="constant")
    resolution = forms.IntegerField(initial=1024, min_value=64, help_text="A multiple of 64")
    trigger_token = forms.CharField(required=False, max_length=100, help_text="Empty: ohwx_<slug>")
    seed = forms.IntegerField(required=False, min_value=0, help_text="Empty: random")
    validation_prompt = forms.CharField(
        required=False,
        max_length=4000,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Optional: one render with the new LoRA, identity-scored",
    )


@admin.register(TrainingJob)
class TrainingJobAdmin(LiveJobStatusAdmin, TenantScopedAdmin):
    list_display = ["id", "character", "base_model", "live_status", "live_progress", "loss", "lora", "attempt",
                    "tenant", "queued_at", "device_seconds"]  # fmt: skip
    list_filter = ["status", "base_model", "error_code", TENANT_FILTER]
    search_fields = ["=id", "character__name", "character__slug", "trigger_token", "idempotency_key"]
    date_hierarchy = "queued_at"
    readonly_fields = [f.name for f in TrainingJob._meta.fields] + [
        "live_status", "live_progress", "queue_wait_seconds", "run_seconds", "loss_curve", "validation_preview",
    ]  # fmt: skip
    fieldsets = [
        ("Status", {"fields": ["live_status", "live_progress", ("current_step", "total_steps"),
                               ("loss", "steps_per_second"),
                               "loss_curve", "cancel_requested", ("error_code", "error_message"), "error_details"]}),
        ("Result", {"fields": ["lora", "validation_preview", ("validation_identity_similarity",
                                                              "validation_identity_reason")]}),
        ("Request", {"fields": ["tenant", "character", "base_model", ("steps", "rank", "alpha"),
                                ("learning_rate", "lr_schedule", "warmup_steps"), ("resolution", "seed"),
                                "trigger_token", "captions", "validation_prompt",
                                ("requested_by", "requested_by_api_key"), "idempotency_key"]}),
        ("Run", {"fields": [("queued_at", "started_at", "finished_at"), ("queue_wait_seconds", "run_seconds"),
                            ("device", "device_seconds"), "timings", "usage",
                            ("checkpoint_step", "resumed_from_step")]}),
        ("Worker and lease", {"classes": ["collapse"],
                              "fields": ["attempt", "worker", "lease_expires_at", "heartbeat_at", "checkpoint_file",
                                         "request_hash"]}),
    ]  # fmt: skip
    exclude = ["validation_image", "loss_history"]
    actions = ["cancel"]

    def has_add_permission(self, request):
        return False  # from the character page ("Train a LoRA…") or the API, which validate and enqueue

    def has_delete_permission(self, request, obj=None):
        if obj is not None and obj.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            return False  # cancel first: a worker is writing its checkpoints
        return super().has_delete_permission(request, obj)

    @admin.display(description="Loss curve")
    def loss_curve(self, obj):
        """The logged losses as a small line chart (no JavaScript)."""
        points = [(float(step), float(loss)) for step, loss in obj.loss_history or []]
        if len(points) < 2:
            return "—"
        width, height = 360, 80
        low, high = min(p[1] for p in points), max(p[1] for p in points)
        span_x, span_y = (points[-1][0] - points[0][0]) or 1.0, (high - low) or 1.0
        line = " ".join(
            f"{(x - points[0][0]) / span_x * width:.1f},{height - (y - low) / span_y * height:.1f}" for x, y in points
        )
        return format_html(
            '<svg width="{}" height="{}" style="border:1px solid #ddd"><polyline fill="none" stroke="#417690" '
            'stroke-width="1.5" points="{}"/></svg><br>{} → {} over steps {}–{}',
            width, height, line, f"{points[0][1]:.4f}", f"{points[-1][1]:.4f}", int(points[0][0]), int(points[-1][0]),
        )  # fmt: skip

    @admin.display(description="Validation render")
    def validation_preview(self, obj):
        if not obj.validation_image:
            return "—"
        url = reverse("admin:training_validation_image", args=[obj.pk])
        return format_html('<img src="{}" style="max-width:256px;max-height:256px">', url)

    @admin.action(description="Cancel selected trainings", permissions=["change"])
    def cancel(self, request, queryset):
        queryset = self.editable_queryset(request, queryset)
        for job in queryset:
            training_cancel(job=job)
        messages.info(request, f"Cancel requested for {queryset.count()} training(s).")

    def get_urls(self):
        return [
            path("train/<int:character_id>/", self.admin_site.admin_view(self.train_view),
                 name="training_trainingjob_train"),
            path("<int:job_id>/validation.png", self.admin_site.admin_view(self.validation_image_view),
                 name="training_validation_image"),
            *super().get_urls(),
        ]  # fmt: skip

    def validation_image_view(self, request, job_id: int):
        job = self.get_queryset(request).filter(pk=job_id).first()  # only the user's tenants
        if job is None or not job.validation_image:
            raise Http404("No such validation render.")
        return FileResponse(job.validation_image.open("rb"), content_type="image/png")

    def train_view(self, request, character_id: int):
        """The character page's "Train a LoRA…": the same service as the API."""
        from characters.models import Character, ReferenceImage

        character = Character.objects.unscoped().filter(pk=character_id).first()
        character_admin = self.admin_site._registry.get(Character)
        allowed = character is not None and character_admin is not None
        if not allowed or not character_admin.has_change_permission(request, character):
            raise Http404("No such character.")
        form = TrainForm(request.POST or None)
        error = None
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                job, _ = training_submit(
                    tenant=character.tenant, character=character, base_model=data["base_model"], steps=data["steps"],
                    rank=data["rank"], alpha=data["alpha"], learning_rate=data["learning_rate"],
                    lr_schedule=data["lr_schedule"], resolution=data["resolution"],
                    trigger_token=data["trigger_token"], seed=data["seed"],
                    validation_prompt=data["validation_prompt"], requested_by=request.user,
                )  # fmt: skip
            except AlkemyError as exc:
                error = f"{exc.message} ({exc.code})"
            else:
                messages.success(request, f"Training #{job.pk} queued.")
                return redirect("admin:training_trainingjob_change", job.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Train a LoRA of {character.name}",
            "opts": self.model._meta,
            "character": character,
            "reference_count": ReferenceImage.objects.unscoped().filter(character=character).count(),
            "form": form,
            "error": error,
        }
        return TemplateResponse(request, "admin/training/train.html", context)
