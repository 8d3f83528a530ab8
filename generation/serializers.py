from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from alkemy.api.fields import StrictCharField, StrictFloatField, StrictIntegerField
from alkemy.api.schema import ErrorSerializer  # a failed job's error has the API error's shape
from generation.methods import DEFAULT_METHOD, METHODS
from generation.models import GeneratedImage, GenerationJob


class GenerationCreateSerializer(serializers.Serializer):
    character = StrictIntegerField()
    method = serializers.ChoiceField(choices=list(METHODS), default=DEFAULT_METHOD)
    prompt = StrictCharField(max_length=4000)
    negative_prompt = StrictCharField(max_length=4000, required=False, allow_blank=True, default="")
    width = StrictIntegerField(required=False, default=1024)
    height = StrictIntegerField(required=False, default=1024)
    steps = StrictIntegerField(required=False, allow_null=True, default=None)
    guidance = StrictFloatField(required=False, allow_null=True, default=None)
    seed = StrictIntegerField(required=False, allow_null=True, default=None, min_value=0, max_value=2**31 - 1)
    num_images = StrictIntegerField(required=False, default=1)
    params = serializers.DictField(required=False, default=dict, help_text="Method parameters, e.g. id_weight")


class GeneratedImageSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()

    class Meta:
        model = GeneratedImage
        fields = ["id", "index", "url", "seed", "width", "height", "identity_similarity", "identity_reason", "face_box"]
        read_only_fields = fields

    @extend_schema_field(serializers.CharField())
    def get_url(self, obj) -> str:
        path = f"/api/v1/generations/{obj.job_id}/outputs/{obj.pk}/image"
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request else path


class EstimateSerializer(serializers.Serializer):
    job_kind = serializers.CharField()
    method = serializers.CharField()
    gpu_class = serializers.CharField(allow_null=True)
    device_seconds = serializers.FloatField()
    cost = serializers.CharField(help_text="USD with six decimals, e.g. `0.039000`")
    currency = serializers.CharField()
    basis = serializers.CharField(help_text="What the estimate rests on: the method's history or its fallback rates")
    lines = serializers.ListField(child=serializers.DictField(), help_text="Meter, quantity, unit price and cost")
    price_book = serializers.IntegerField(allow_null=True)


class GenerationQuoteSerializer(serializers.Serializer):
    """What `?dry_run=true` answers (usage.services.Quote): the estimate and the verdicts; no job is created."""

    dry_run = serializers.BooleanField()
    estimate = EstimateSerializer()
    budget = serializers.DictField(help_text="The tenant's budget this month: limit, spent, reserved, remaining")
    jobs = serializers.DictField(help_text="The tenant's job limits and its active jobs")
    allowed = serializers.BooleanField(help_text="Whether the same request without dry_run would be admitted")
    refusal = ErrorSerializer(allow_null=True, help_text="The error a real submission would answer, if refused")


class GenerationJobSerializer(serializers.ModelSerializer):
    outputs = GeneratedImageSerializer(many=True, read_only=True)
    error = serializers.SerializerMethodField()
    queue_wait_seconds = serializers.FloatField(read_only=True)
    run_seconds = serializers.FloatField(read_only=True)
    cost = serializers.SerializerMethodField(help_text="USD: the job's ledger events and total, and its estimate")

    class Meta:
        model = GenerationJob
        fields = [
            "id", "status", "character", "method", "embedder", "prompt", "negative_prompt", "width", "height",
            "steps", "guidance", "seed", "num_images", "params", "progress", "current_step", "total_steps",
            "attempt", "cancel_requested", "error", "outputs", "device", "device_seconds", "usage", "cost", "queued_at",
            "started_at", "finished_at", "queue_wait_seconds", "run_seconds",
        ]  # fmt: skip
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_cost(self, obj) -> dict:
        from usage.selectors import job_cost

        return job_cost(job_kind="generation", job_id=obj.pk, tenant_id=obj.tenant_id)

    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(self, obj):
        if not obj.error_code:
            return None
        return {"code": obj.error_code, "message": obj.error_message, "details": obj.error_details}
