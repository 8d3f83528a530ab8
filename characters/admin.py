"""Admin for studio staff: characters with their reference photos, and "find character by photo"."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import Count
from django.http import Http404, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from alkemy.admin_jobs import LiveJobStatusAdmin
from alkemy.errors import AlkemyError
from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin, TenantScopedInline, _roles_by_tenant
from alkemy.tenancy.models import Tenant
from characters.models import Character, CharacterImport, ReferenceImage
from characters.services import character_delete, faces_search, reference_add, reference_delete
from characters.thumbnails import reference_thumbnail, thumbnail_size


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    widget = MultipleFileInput

    def clean(self, data, initial=None):
        files = data if isinstance(data, (list, tuple)) else [data]
        return [super(MultipleFileField, self).clean(f, initial) for f in files if f]


class CharacterForm(forms.ModelForm):
    new_references = MultipleFileField(
        required=False,
        label="Add reference photos",
        help_text="JPEG, PNG or WebP, one person per photo. Each is checked and embedded on save.",
    )

    class Meta:
        model = Character
        fields = ["tenant", "name", "slug", "description", "tags", "is_archived"]


def thumbnail_url(reference: ReferenceImage, *, size: int, face: bool = False) -> str:
    url = reverse("admin:characters_reference_thumbnail", args=[reference.pk])
    return f"{url}?size={size}" + ("&face=1" if face else "")


class ReferenceImageInline(TenantScopedInline, admin.TabularInline):
    model = ReferenceImage
    extra = 0
    can_delete = True
    show_change_link = False
    fields = ["photo", "detection", "quality_summary", "warning_list", "other_face_count", "created_at"]
    readonly_fields = fields

    def get_queryset(self, request):
        return ReferenceImage.objects.unscoped().select_related("character")

    def has_add_permission(self, request, obj=None):
        return False  # photos are added with the "Add reference photos" field, which runs the analysis

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return obj is None or request.user.is_superuser or _roles_by_tenant(request).get(obj.tenant_id) != "viewer"

    @admin.display(description="Photo (face box)")
    def photo(self, obj):
        return format_html('<img src="{}" alt="" style="max-height:160px">', thumbnail_url(obj, size=256))

    @admin.display(description="Detection score")
    def detection(self, obj):
        return f"{obj.det_score:.3f} ({obj.embedder})"

    @admin.display(description="Warnings")
    def warning_list(self, obj):
        return ", ".join(w.replace("_", " ") for w in obj.warnings) or "none"

    @admin.display(description="Quality")
    def quality_summary(self, obj):
        q = obj.quality
        return f"face {q.get('face_px')} px, sharpness {q.get('sharpness')}, brightness {q.get('brightness')}"

    @admin.display(description="Other faces")
    def other_face_count(self, obj):
        return len(obj.other_faces)


class TagFilter(admin.SimpleListFilter):
    """The tags used by the characters the user can see."""

    title = "tag"
    parameter_name = "tag"

    def lookups(self, request, model_admin):
        rows = model_admin.get_queryset(request).order_by().values_list("tags", flat=True).distinct()
        return [(tag, tag) for tag in sorted({tag for tags in rows for tag in tags})[:100]]

    def queryset(self, request, queryset):
        return queryset.filter(tags__contains=[self.value()]) if self.value() else queryset


def identity_badge(output, *, threshold: float | None):
    """A rendered image's identity score as a coloured badge: green at or above the embedder's same-person
    threshold, red below it, grey when there is no score (no face found, no identity to compare)."""
    if output.identity_similarity is None:
        reason = (output.identity_reason or "not scored").replace("_", " ")
        return format_html('<span class="identity-badge identity-none" style="{}">{}</span>', BADGE_STYLE + "#777",
                           reason)  # fmt: skip
    same = threshold is not None and output.identity_similarity >= threshold
    colour = "#2e7d32" if same else "#c62828"
    title = f"same-person threshold {threshold}" if threshold is not None else "no threshold for this embedder"
    return format_html(
        '<span class="identity-badge identity-{}" style="{}" title="{}">identity {}</span>',
        "same" if same else "low", BADGE_STYLE + colour, title, f"{output.identity_similarity:.3f}",
    )  # fmt: skip


BADGE_STYLE = "display:inline-block;padding:1px 6px;border-radius:8px;color:#fff;font-size:11px;background:"


@admin.register(Character)
class CharacterAdmin(TenantScopedAdmin):
    form = CharacterForm
    list_display = ["face", "name", "tenant", "reference_count", "tag_list", "is_archived", "updated_at"]
    list_display_links = ["face", "name"]
    list_filter = [TENANT_FILTER, "is_archived", TagFilter]
    search_fields = ["=id", "name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["generate_link", "train_link", "shotlist_link", "generations_gallery", "lora_versions", "spend",
                       "created_by", "created_by_api_key", "created_at", "updated_at"]  # fmt: skip
    inlines = [ReferenceImageInline]

    @admin.display(description="Generate")
    def generate_link(self, obj):
        if obj.pk is None:
            return "Save the character first."
        url = reverse("admin:characters_character_generate", args=[obj.pk])
        return format_html('<a class="button" href="{}">Render this character in a new scene…</a>', url)

    @admin.display(description="LoRA")
    def train_link(self, obj):
        if obj.pk is None:
            return "Save the character first."
        url = reverse("admin:training_trainingjob_train", args=[obj.pk])
        return format_html('<a class="button" href="{}">Train a LoRA…</a>', url)

    @admin.display(description="Shot list")
    def shotlist_link(self, obj):
        if obj.pk is None:
            return "Save the character first."
        url = reverse("admin:shotlists_shotlist_new", args=[obj.pk])
        return format_html('<a class="button" href="{}">Shot list…</a>', url)

    @admin.display(description="Generations")
    def generations_gallery(self, obj):
        """The character's newest renders, each linking to its job, with its identity score."""
        from characters.faces import embedder_infos
        from generation.selectors import character_outputs

        if obj.pk is None:
            return "—"
        outputs = list(character_outputs(tenant_id=obj.tenant_id, character_id=obj.pk))
        if not outputs:
            return "No renders yet."
        infos = embedder_infos()
        figures = format_html_join(
            "",
            '<figure style="margin:0;width:136px"><a href="{}"><img src="{}" alt="generation #{} image {}" '
            'style="width:128px;height:128px;object-fit:cover;border:1px solid #ccc"></a>'
            '<figcaption style="font-size:11px">{} #{} {}</figcaption></figure>',
            (
                (
                    reverse("admin:generation_generationjob_change", args=[output.job_id]),
                    reverse("admin:generation_output_image", args=[output.pk]),
                    output.job_id, output.index + 1,
                    identity_badge(output, threshold=getattr(infos.get(output.job.embedder), "match_threshold", None)),
                    output.job_id, output.job.method,
                )  # fmt: skip
                for output in outputs
            ),
        )
        all_url = reverse("admin:generation_generationjob_changelist") + f"?character__id__exact={obj.pk}"
        return format_html(
            '<div class="generation-gallery" style="display:flex;flex-wrap:wrap;gap:8px">{}</div>'
            '<p><a href="{}">All generations of {}</a></p>',
            figures, all_url, obj.name,
        )  # fmt: skip

    @admin.display(description="LoRA versions")
    def lora_versions(self, obj):
        from training.selectors import character_lora_versions

        if obj.pk is None:
            return "—"
        versions = list(character_lora_versions(tenant_id=obj.tenant_id, character_id=obj.pk))
        if not versions:
            return "No LoRA versions yet."
        rows = format_html_join(
            "",
            '<tr><td><a href="{}">v{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse("admin:training_loraartifact_change", args=[v.pk]), v.version, v.base_model,
                    v.lora_format, v.rank or "—", v.trigger_token or "—", v.get_source_display(),
                    "in use" if v.is_selected else "",
                )  # fmt: skip
                for v in versions
            ),
        )
        return format_html(
            '<table class="lora-versions"><thead><tr><th>Version</th><th>Base</th><th>Format</th><th>Rank</th>'
            "<th>Trigger</th><th>Source</th><th></th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="Spend (USD)")
    def spend(self, obj):
        from usage.money import exact
        from usage.selectors import character_spend

        if obj.pk is None:
            return "—"
        spend = character_spend(tenant_id=obj.tenant_id, character_id=obj.pk)
        methods = format_html_join(
            ", ", "{} ${} ({} events)", ((m["method"], exact(m["cost"]), m["events"]) for m in spend["by_method"])
        )
        unbilled = exact(spend["unbilled"]) if spend["unbilled"] else None
        ledger_url = reverse("admin:usage_usageevent_changelist") + f"?character_id={obj.pk}"
        return format_html(
            '<p class="character-spend">This month ${}, all time ${} over {} usage events{}{}. '
            '<a href="{}">Usage events</a></p>',
            exact(spend["this_month"]), exact(spend["total"]), spend["events"],
            format_html(" — {}", methods) if spend["by_method"] else "",
            format_html("; not billed (failures on our side) ${}", unbilled) if unbilled else "",
            ledger_url,
        )  # fmt: skip

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(reference_total=Count("references"))

    @admin.display(description="Face")
    def face(self, obj):
        reference = ReferenceImage.objects.unscoped().filter(character=obj).order_by("-det_score").first()
        if reference is None:
            return "—"
        return format_html('<img src="{}" alt="" height="48">', thumbnail_url(reference, size=96, face=True))

    @admin.display(description="References", ordering="reference_total")
    def reference_count(self, obj):
        return obj.reference_total

    @admin.display(description="Tags")
    def tag_list(self, obj):
        return ", ".join(obj.tags)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        for upload in form.cleaned_data.get("new_references") or []:
            try:
                added = reference_add(character=form.instance, upload=upload, created_by=request.user)
            except AlkemyError as exc:
                messages.error(request, f"{upload.name}: not added — {exc.message} ({exc.code})")
                continue
            messages.success(request, f"{upload.name}: reference added (face {added.reference.quality['face_px']} px).")
            for warning in added.reference.warnings:
                messages.warning(request, f"{upload.name}: {warning.replace('_', ' ')}")
            for similar in added.similar_characters:
                messages.warning(
                    request,
                    f"Possible duplicate: {similar.character.name} (similarity {similar.similarity:.3f}).",
                )

    def save_formset(self, request, form, formset, change):
        if formset.model is ReferenceImage:
            formset.save(commit=False)
            for reference in formset.deleted_objects:
                reference_delete(reference=reference)  # recomputes the identity, removes the file
            return
        super().save_formset(request, form, formset, change)

    def delete_model(self, request, obj):
        character_delete(character=obj)

    def delete_queryset(self, request, queryset):
        for character in queryset:
            character_delete(character=character)

    def get_urls(self):
        return [
            path(
                "find-by-photo/",
                self.admin_site.admin_view(self.find_by_photo),
                name="characters_character_find_by_photo",
            ),
            path(
                "<int:character_id>/generate/",
                self.admin_site.admin_view(self.generate_view),
                name="characters_character_generate",
            ),
            path(
                "references/<int:reference_id>/thumbnail.jpg",
                self.admin_site.admin_view(self.reference_thumbnail_view),
                name="characters_reference_thumbnail",
            ),
            *super().get_urls(),
        ]

    def generate_view(self, request, character_id: int):
        """Submit a generation for the character, through the same service as the API."""
        from django.shortcuts import redirect

        from generation.admin_forms import GenerateForm
        from generation.jobs import generation_submit

        character = Character.objects.filter(pk=character_id).first()  # scoped to the user's tenants
        if character is None:
            raise Http404("No such character.")
        if not self.has_change_permission(request, character):
            raise Http404("No such character.")
        form = GenerateForm(request.POST or None)
        error = None
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                job, _ = generation_submit(
                    tenant=character.tenant, character=character, method=data["method"], prompt=data["prompt"],
                    negative_prompt=data["negative_prompt"], width=data["width"], height=data["height"],
                    steps=data["steps"], seed=data["seed"], num_images=data["num_images"], params=data["params"],
                    requested_by=request.user,
                )  # fmt: skip
            except AlkemyError as exc:
                error = f"{exc.message} ({exc.code})"
            else:
                messages.success(request, f"Generation #{job.pk} queued.")
                return redirect("admin:generation_generationjob_change", job.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Generate {character.name}",
            "opts": self.model._meta,
            "character": character,
            "form": form,
            "error": error,
        }
        return TemplateResponse(request, "admin/generation/generate.html", context)

    def reference_thumbnail_view(self, request, reference_id: int):
        # The admin middleware's scope limits this to the user's tenants.
        reference = ReferenceImage.objects.filter(pk=reference_id).first()
        if reference is None:
            raise Http404("No such reference photo.")
        size = thumbnail_size(request.GET.get("size"))
        data = reference_thumbnail(reference, size=size, face_only=request.GET.get("face") == "1")
        response = HttpResponse(data, content_type="image/jpeg")
        response["Cache-Control"] = "private, max-age=300"
        return response

    def find_by_photo(self, request):
        tenants = (
            Tenant.objects.all()
            if request.user.is_superuser
            else Tenant.objects.filter(pk__in=list(_roles_by_tenant(request)))
        )
        form = FindByPhotoForm(request.POST or None, request.FILES or None, tenants=tenants)
        result, error = None, None
        if request.method == "POST" and form.is_valid():
            try:
                result = faces_search(
                    tenant=form.cleaned_data["tenant"],
                    upload=form.cleaned_data["image"],
                    limit=form.cleaned_data["limit"],
                )
            except AlkemyError as exc:
                error = f"{exc.message} ({exc.code})"
        context = {
            **self.admin_site.each_context(request),
            "title": "Find character by photo",
            "opts": self.model._meta,
            "form": form,
            "result": result,
            "error": error,
        }
        return TemplateResponse(request, "admin/characters/character/find_by_photo.html", context)


class FindByPhotoForm(forms.Form):
    tenant = forms.ModelChoiceField(queryset=Tenant.objects.none())
    image = forms.FileField(help_text="A photo with the face to look for")
    limit = forms.IntegerField(min_value=1, max_value=50, initial=10)

    def __init__(self, *args, tenants, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["tenant"].queryset = tenants
        if tenants.count() == 1:
            self.fields["tenant"].initial = tenants.first()


@admin.register(CharacterImport)
class CharacterImportAdmin(LiveJobStatusAdmin, TenantScopedAdmin):
    """Bulk imports, read-only: they are submitted through the API or `manage.py import_characters`."""

    list_display = ["id", "archive_name", "live_status", "live_progress", "total_files", "enrolled_count",
                    "skipped_count", "refused_count", "characters_created", "duplicate_count", "dry_run", "tenant",
                    "queued_at"]  # fmt: skip
    list_filter = ["status", "dry_run", "error_code", TENANT_FILTER]
    search_fields = ["=id", "archive_name", "archive_sha256", "idempotency_key"]
    date_hierarchy = "queued_at"
    readonly_fields = [f.name for f in CharacterImport._meta.fields] + ["live_status", "live_progress", "report_table"]
    fieldsets = [
        ("Status", {"fields": ["live_status", "live_progress", ("current_step", "total_steps"), "cancel_requested",
                               ("error_code", "error_message"), "error_details"]}),
        ("Result", {"fields": [("total_files", "enrolled_count", "skipped_count", "refused_count"),
                               ("characters_created", "duplicate_count"), "report_table"]}),
        ("Request", {"fields": ["tenant", ("archive_name", "archive_size"), "archive_sha256", "dry_run", "embedder",
                                ("requested_by", "requested_by_api_key"), "idempotency_key"]}),
        ("Run", {"fields": [("queued_at", "started_at", "finished_at"), "timings"]}),
        ("Worker and lease", {"classes": ["collapse"],
                              "fields": ["attempt", "worker", "lease_expires_at", "heartbeat_at", "request_hash"]}),
    ]  # fmt: skip

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="Files")
    def report_table(self, obj):
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (entry.get("path"), entry.get("outcome"), entry.get("code"), entry.get("message"),
                 ", ".join(f"{s['name']} ({s['similarity']:.3f})" for s in entry.get("similar") or []))
                for entry in obj.report or []
            ),
        )  # fmt: skip
        header = "<tr><th>File</th><th>Outcome</th><th>Code</th><th>Message</th><th>Resembles</th></tr>"
        return format_html("<table>{}{}</table>", format_html(header), rows)
