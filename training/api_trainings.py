"""LoRA training endpoints: submit (202), list, read, cancel, the validation render; and a LoRA file download."""

import django_filters
from django.http import FileResponse
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from alkemy.api.base import TenantAPIView, TenantViewSet
from alkemy.api.filters import query_flag
from alkemy.errors import NotFound
from alkemy.jobs import JobStatus
from characters.selectors import character_get
from generation.api import DRY_RUN_PARAMETER, IDEMPOTENCY_PARAMETER, submission_responses
from training import jobs
from training.models import BaseModel, LoraArtifact, TrainingJob
from usage.api import RetryAfterMixin


class TrainingCreateSerializer(serializers.Serializer):
    """Types only: ranges and references are checked by `training_submit`, with their own error codes."""

    character = serializers.IntegerField()
    base_model = serializers.ChoiceField(choices=BaseModel.choices)
    steps = serializers.IntegerField(required=False, allow_null=True, default=None, help_text="1000 by default")
    rank = serializers.IntegerField(required=False, default=jobs.DEFAULT_RANK)
    alpha = serializers.FloatField(required=False, allow_null=True, default=None, help_text="= rank by default")
    learning_rate = serializers.FloatField(required=False, allow_null=True, default=None)
    lr_schedule = serializers.ChoiceField(choices=jobs.LR_SCHEDULES, required=False, default="constant")
    warmup_steps = serializers.IntegerField(required=False, allow_null=True, default=None)
    resolution = serializers.IntegerField(required=False, default=jobs.DEFAULT_RESOLUTION)
    trigger_token = serializers.CharField(required=False, allow_blank=True, default="", max_length=100,
                                          help_text="Default: ohwx_<character slug>")  # fmt: skip
    captions = serializers.DictField(
        child=serializers.CharField(max_length=1000),
        required=False,
        default=dict,
        help_text="Caption per reference id; default 'a photo of <trigger> person'",
    )
    seed = serializers.IntegerField(required=False, allow_null=True, default=None)
    validation_prompt = serializers.CharField(required=False, allow_blank=True, default="", max_length=4000)


class TrainedLoraSerializer(serializers.ModelSerializer):
    class Meta:
        model = LoraArtifact
        fields = ["id", "version", "base_model", "rank", "trigger_token", "is_selected", "file_size", "sha256"]
        read_only_fields = fields


class TrainingJobSerializer(serializers.ModelSerializer):
    error = serializers.SerializerMethodField()
    validation = serializers.SerializerMethodField()
    lora = TrainedLoraSerializer(read_only=True)
    queue_wait_seconds = serializers.FloatField(read_only=True)
    run_seconds = serializers.FloatField(read_only=True)

    class Meta:
        model = TrainingJob
        fields = [
            "id", "status", "character", "base_model", "steps", "rank", "alpha", "learning_rate", "lr_schedule",
            "warmup_steps", "resolution", "trigger_token", "captions", "seed", "validation_prompt", "progress",
            "current_step", "total_steps", "loss", "loss_history", "steps_per_second", "attempt",
            "checkpoint_step", "resumed_from_step", "cancel_requested", "error", "lora", "validation", "device",
            "device_seconds", "usage", "timings", "queued_at", "started_at", "finished_at", "queue_wait_seconds",
            "run_seconds",
        ]  # fmt: skip
        read_only_fields = fields

    def get_error(self, obj) -> dict | None:
        if not obj.error_code:
            return None
        return {"code": obj.error_code, "message": obj.error_message, "details": obj.error_details}

    @extend_schema_field(serializers.DictField(allow_null=True))
    def get_validation(self, obj) -> dict | None:
        if not obj.validation_image:
            return None
        path = f"/api/v1/trainings/{obj.pk}/validation-image"
        request = self.context.get("request")
        return {
            "url": request.build_absolute_uri(path) if request else path,
            "identity_similarity": obj.validation_identity_similarity,
            "identity_reason": obj.validation_identity_reason or None,
        }


class TrainingFilter(django_filters.FilterSet):
    character = django_filters.NumberFilter(field_name="character_id", help_text="Only jobs of this character")
    status = django_filters.ChoiceFilter(choices=JobStatus.choices)
    base_model = django_filters.ChoiceFilter(choices=BaseModel.choices)

    class Meta:
        model = TrainingJob
        fields = ["character", "status", "base_model"]


class TrainingViewSet(RetryAfterMixin, TenantViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """LoRA training jobs of the tenant. Filter with `?character=`, `?status=`, `?base_model=`.

    Submitting is admitted by the tenant's budget and job limits: 402 `budget_exceeded`, 429 `too_many_jobs`
    (with `Retry-After`). `?dry_run=true` answers 200 with the estimate and the verdicts, creating nothing.
    """

    serializer_class = TrainingJobSerializer
    filterset_class = TrainingFilter
    ordering_fields = ["queued_at", "finished_at"]
    ordering = ["-queued_at"]

    def tenant_queryset(self):
        return TrainingJob.objects.filter(tenant=self.tenant).select_related("lora")

    def get_object(self):
        pk = str(self.kwargs["pk"])
        found = self.get_queryset().filter(pk=int(pk)).first() if pk.isascii() and pk.isdigit() else None
        if found is None:
            raise NotFound("No such training.", code="training_not_found")
        return found

    @extend_schema(
        summary="Train a LoRA of a character from its reference photos",
        request=TrainingCreateSerializer,
        responses=submission_responses(TrainingJobSerializer),
        parameters=[IDEMPOTENCY_PARAMETER, DRY_RUN_PARAMETER],
    )
    def create(self, request):
        form = TrainingCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = dict(form.validated_data)
        character = character_get(tenant=self.tenant, character_id=data.pop("character"))
        if query_flag(request, "dry_run"):
            quote, _ = jobs.training_submit(tenant=self.tenant, character=character, dry_run=True, **data)
            return Response({"dry_run": True, **quote.as_dict()}, status=200)
        job, _ = jobs.training_submit(
            tenant=self.tenant,
            character=character,
            idempotency_key=request.headers.get("Idempotency-Key") or None,
            **self.requester(),
            **data,
        )
        return Response(self.get_serializer(job).data, status=202)

    @extend_schema(summary="Cancel a queued or running training", request=None, responses=TrainingJobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return Response(self.get_serializer(jobs.training_cancel(job=self.get_object())).data)

    @extend_schema(summary="Download the validation render", responses={(200, "image/png"): bytes})
    @action(detail=True, methods=["get"], url_path="validation-image")
    def validation_image(self, request, pk=None):
        job = self.get_object()
        if not job.validation_image:
            raise NotFound("This training has no validation render.", code="validation_image_not_found")
        return FileResponse(job.validation_image.open("rb"), content_type="image/png")


class LoraFileView(TenantAPIView):
    """GET /characters/{cid}/loras/{lid}/file: the LoRA's safetensors file, for the tenant only."""

    @extend_schema(summary="Download a LoRA version", responses={(200, "application/octet-stream"): bytes})
    def get(self, request, character_pk: int, pk: int):
        character = character_get(tenant=self.tenant, character_id=character_pk)
        artifact = LoraArtifact.objects.filter(tenant=self.tenant, character=character, pk=pk).first()
        if artifact is None:
            raise NotFound("No such LoRA version.", code="lora_not_found")
        return FileResponse(
            artifact.file.open("rb"),
            as_attachment=True,
            filename=f"{character.slug}-lora-v{artifact.version}-{artifact.base_model}.safetensors",
            content_type="application/octet-stream",
        )
