"""Generation endpoints: submit (202), list, read, cancel, download outputs."""

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins
from rest_framework.decorators import action
from rest_framework.response import Response

from alkemy.api.base import TenantViewSet
from alkemy.api.filters import query_flag
from alkemy.errors import NotFound
from characters.selectors import character_get
from generation import jobs
from generation.filters import GenerationFilter
from generation.models import GeneratedImage, GenerationJob
from generation.serializers import GenerationCreateSerializer, GenerationJobSerializer, GenerationQuoteSerializer
from usage.api import RetryAfterMixin

IDEMPOTENCY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="A retry with the same key and body returns the same job; a different body answers 409.",
)

DRY_RUN_PARAMETER = OpenApiParameter(
    "dry_run",
    bool,
    OpenApiParameter.QUERY,
    required=False,
    description="true: answer 200 with the cost estimate, device seconds, GPU class and budget verdict; no job.",
)


def submission_responses(job_serializer) -> dict:
    """What a job-submitting POST answers: the job (202), the dry-run quote (200), and the admission refusals."""
    return {
        202: job_serializer,
        200: OpenApiResponse(GenerationQuoteSerializer, description="dry_run: the estimate and verdicts, no job"),
        402: OpenApiResponse(OpenApiTypes.OBJECT, description="budget_exceeded: spent, limit, estimate in details"),
        429: OpenApiResponse(OpenApiTypes.OBJECT, description="too_many_jobs, with a Retry-After header"),
    }


class GenerationViewSet(RetryAfterMixin, TenantViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """Generation jobs of the tenant. Filter with `?character=`, `?status=`, `?method=`.

    Submitting is admitted by the tenant's budget and job limits: 402 `budget_exceeded`, 429 `too_many_jobs`
    (with `Retry-After`). `?dry_run=true` answers 200 with the estimate and the verdicts, creating nothing.
    """

    serializer_class = GenerationJobSerializer
    filterset_class = GenerationFilter
    ordering_fields = ["queued_at", "finished_at"]
    ordering = ["-queued_at"]

    def tenant_queryset(self):
        return GenerationJob.objects.filter(tenant=self.tenant).prefetch_related("outputs")

    def get_object(self):
        try:
            return self.get_queryset().get(pk=int(self.kwargs["pk"]))
        except (GenerationJob.DoesNotExist, ValueError):
            raise NotFound("No such generation.", code="generation_not_found") from None

    @extend_schema(
        summary="Render a character in a new scene",
        request=GenerationCreateSerializer,
        responses=submission_responses(GenerationJobSerializer),
        parameters=[IDEMPOTENCY_PARAMETER, DRY_RUN_PARAMETER],
    )
    def create(self, request):
        form = GenerationCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = dict(form.validated_data)
        character = character_get(tenant=self.tenant, character_id=data.pop("character"))
        if query_flag(request, "dry_run"):
            quote, _ = jobs.generation_submit(tenant=self.tenant, character=character, dry_run=True, **data)
            return Response({"dry_run": True, **quote.as_dict()}, status=200)
        job, _ = jobs.generation_submit(
            tenant=self.tenant,
            character=character,
            idempotency_key=request.headers.get("Idempotency-Key") or None,
            **self.requester(),
            **data,
        )
        return Response(self.get_serializer(job).data, status=202)

    @extend_schema(summary="Cancel queued or running work", request=None, responses=GenerationJobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = jobs.generation_cancel(job=self.get_object())
        return Response(self.get_serializer(job).data)

    @extend_schema(summary="Download an output image", responses={(200, "image/png"): bytes})
    @action(detail=True, methods=["get"], url_path=r"outputs/(?P<output_id>\d+)/image")
    def output_image(self, request, pk=None, output_id=None):
        job = self.get_object()
        output = GeneratedImage.objects.filter(tenant=self.tenant, job=job, pk=output_id).first()
        if output is None:
            raise NotFound("No such output.", code="output_not_found")
        return FileResponse(output.file.open("rb"), content_type="image/png")
