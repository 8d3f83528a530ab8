"""Shot list endpoints: submit (202), list, read, cancel, re-roll, consistency report, contact sheet."""

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import mixins
from rest_framework.decorators import action
from rest_framework.response import Response

from alkemy.api.base import TenantViewSet
from alkemy.api.filters import query_flag
from alkemy.errors import AlkemyError
from characters.selectors import character_get
from shotlists import services
from shotlists.contact_sheet import render_contact_sheet
from shotlists.report import report_csv, shotlist_report
from shotlists.selectors import shotlist_get, shotlist_list
from shotlists.serializers import RerollSerializer, ShotListCreateSerializer, ShotListSerializer
from usage.api import RetryAfterMixin

DRY_RUN_PARAMETER = OpenApiParameter(
    "dry_run", bool, OpenApiParameter.QUERY, required=False,
    description="true: answer 200 with the list's estimate (per method and total) and the budget verdict; no jobs",
)  # fmt: skip

FORMAT_PARAMETER = OpenApiParameter(
    "format", str, OpenApiParameter.QUERY, required=False, enum=["json", "csv"],
    description="csv: one row per character × method (text/csv) instead of JSON",
)  # fmt: skip


class ShotListViewSet(RetryAfterMixin, TenantViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """Shot lists of the tenant: a storyboard rendered for characters × methods × shots as generation jobs.

    Submitting validates every job first and is admitted by the tenant's budget and job limits like single
    generations (402 `budget_exceeded`, 429 `too_many_jobs` with `Retry-After`); any refusal refuses the
    whole list, with the shot's index in `details.shot`, and queues nothing.
    """

    serializer_class = ShotListSerializer

    def tenant_queryset(self):
        return shotlist_list(tenant=self.tenant)

    def get_object(self):
        return shotlist_get(tenant=self.tenant, shot_list_id=self.kwargs["pk"])

    def get_serializer_context(self):
        # the list answers summaries; a single shot list lists its jobs
        return {**super().get_serializer_context(), "with_jobs": self.action != "list"}

    @extend_schema(
        summary="Render characters across a storyboard",
        request=ShotListCreateSerializer,
        responses={
            202: ShotListSerializer,
            200: OpenApiResponse(OpenApiTypes.OBJECT, description="dry_run: the estimate and verdicts, no jobs"),
            402: OpenApiResponse(OpenApiTypes.OBJECT, description="budget_exceeded for one of the jobs"),
            429: OpenApiResponse(OpenApiTypes.OBJECT, description="too_many_jobs, with a Retry-After header"),
        },
        parameters=[DRY_RUN_PARAMETER],
    )
    def create(self, request):
        form = ShotListCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        characters = [character_get(tenant=self.tenant, character_id=pk) for pk in data["characters"]]
        shots = [services.ShotSpec(**shot) for shot in data["shots"]]
        if query_flag(request, "dry_run"):
            quote = services.shotlist_quote(
                tenant=self.tenant, characters=characters, methods=data["methods"], shots=shots,
                images_per_shot=data["images_per_shot"], method_params=data["method_params"],
            )  # fmt: skip
            return Response({"dry_run": True, **quote}, status=200)
        shot_list, _ = services.shotlist_submit(
            tenant=self.tenant,
            name=data["name"],
            characters=characters,
            methods=data["methods"],
            shots=shots,
            images_per_shot=data["images_per_shot"],
            method_params=data["method_params"],
            idempotency_key=data["idempotency"] or request.headers.get("Idempotency-Key") or None,
            **self.requester(),
        )
        return Response(self.get_serializer(shot_list).data, status=202)

    @extend_schema(summary="Cancel every job of the list that has not finished", request=None,
                   responses=ShotListSerializer)  # fmt: skip
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        shot_list = self.get_object()
        services.shotlist_cancel(shot_list=shot_list)
        return Response(self.get_serializer(shot_list).data)

    @extend_schema(
        summary="Render outputs again with new seeds (default: every outlier)",
        request=RerollSerializer,
        responses={202: ShotListSerializer},
    )
    @action(detail=True, methods=["post"])
    def reroll(self, request, pk=None):
        shot_list = self.get_object()
        form = RerollSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        services.shotlist_reroll(shot_list=shot_list, output_ids=form.validated_data["outputs"])
        return Response(self.get_serializer(shot_list).data, status=202)

    @extend_schema(
        summary="Consistency report per character × method",
        parameters=[FORMAT_PARAMETER],
        responses={200: OpenApiTypes.OBJECT, (200, "text/csv"): OpenApiTypes.STR},
    )
    @action(detail=True, methods=["get"])
    def report(self, request, pk=None):
        shot_list = self.get_object()
        wanted = request.query_params.get("format", "json")
        if wanted not in ("json", "csv"):
            raise AlkemyError("format must be json or csv.", code="invalid_parameter", field="format")
        report = shotlist_report(shot_list=shot_list)
        if wanted == "csv":
            response = HttpResponse(report_csv(report), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="shotlist-{shot_list.pk}-report.csv"'
            return response
        return Response(report)

    @extend_schema(summary="Contact sheet: rows character × method, columns shots",
                   responses={(200, "image/png"): bytes})  # fmt: skip
    @action(detail=True, methods=["get"], url_path="contact-sheet.png")
    def contact_sheet(self, request, pk=None):
        shot_list = self.get_object()
        png = render_contact_sheet(shot_list=shot_list, report=shotlist_report(shot_list=shot_list))
        return HttpResponse(png, content_type="image/png")
