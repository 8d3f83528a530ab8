"""Character registry endpoints. Thin: parse, call one service or selector, render."""

from django.http import FileResponse
from django_filters.utils import translate_validation
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from alkemy.api.base import TenantAPIView, TenantModelViewSet, TenantViewSet
from alkemy.api.filters import DeclaredSearchFilter, StrictOrderingFilter
from alkemy.api.limits import IMPORT_UPLOAD, PHOTO_UPLOAD
from alkemy.api.schema import error_response
from alkemy.tenancy.authentication import ApiKeyPrincipal
from alkemy.tenancy.models import Role
from characters import import_jobs, selectors, services
from characters.filters import CharacterFilter
from characters.models import Character
from characters.serializers import (
    CharacterImportRequestSerializer,
    CharacterImportSerializer,
    CharacterSerializer,
    FaceSearchRequestSerializer,
    FaceSearchResponseSerializer,
    ImageUploadSerializer,
    ReferenceCreatedSerializer,
    ReferenceImageSerializer,
    SimilarCharacterSerializer,
    SimilarQuerySerializer,
    SimilarResponseSerializer,
)


def _creator_kwargs(request) -> dict:
    if isinstance(request.user, ApiKeyPrincipal):
        return {"created_by_api_key": request.user.api_key}
    return {"created_by": request.user}


def _face_json(face) -> dict:
    return {"box": [round(v, 1) for v in face.box], "det_score": round(face.score, 4)}


class CharacterViewSet(TenantModelViewSet):
    """The tenant's characters. `?search=` matches name and description, `?tag=` a tag."""

    serializer_class = CharacterSerializer
    filterset_class = CharacterFilter
    search_fields = ["name", "description", "slug"]
    ordering_fields = ["name", "created_at", "updated_at"]
    ordering = ["name"]

    def tenant_queryset(self):
        return selectors.character_list(tenant=self.tenant)

    def list(self, request, *args, **kwargs):
        # ListModelMixin's list, its page read as tuples by one hand-written statement (selectors.CharacterRows)
        # from the parameters the filter backends read and check; a comment, not a docstring: drf-spectacular
        # would publish a docstring as the operation's description.
        rows = selectors.CharacterRows(tenant=self.tenant, query=self.character_query(request))
        page = self.paginate_queryset(rows)
        if page is None:
            return Response(CharacterSerializer.rows_representation(rows))
        return self.get_paginated_response(CharacterSerializer.rows_representation(page))

    def character_query(self, request) -> selectors.CharacterQuery:
        """The list's parameters, read and refused (400) by the same backends that document them."""
        filters = {}
        if any(param.startswith(tuple(CharacterFilter.base_filters)) for param in request.query_params):
            filterset = CharacterFilter(request.query_params, queryset=Character.objects.none(), request=request)
            if not filterset.is_valid():
                raise translate_validation(filterset.errors)
            filters = filterset.form.cleaned_data
        tag = (filters.get("tag") or "").strip().lower()  # as CharacterFilter.filter_tag
        return selectors.CharacterQuery(
            search_terms=tuple(DeclaredSearchFilter().get_search_terms(request)),
            tag=tag or None,
            archived=filters.get("archived"),
            ordering=tuple(StrictOrderingFilter().get_ordering(request, None, self)),
        )

    def get_object(self):
        character = selectors.character_get(tenant=self.tenant, character_id=self.kwargs["pk"])
        self.check_object_permissions(self.request, character)
        return character

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        character = services.character_create(
            tenant=self.tenant,
            name=data["name"],
            slug=data.get("slug", ""),
            description=data.get("description", ""),
            tags=data.get("tags", []),
            **_creator_kwargs(request),
        )
        return Response(self.get_serializer(character).data, status=status.HTTP_201_CREATED)

    def update(self, request, *args, **kwargs):
        partial = kwargs.pop("partial", False)
        character = self.get_object()
        serializer = self.get_serializer(character, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        character = services.character_update(character=character, **serializer.validated_data)
        return Response(self.get_serializer(character).data)

    def perform_destroy(self, instance):
        services.character_delete(character=instance)

    @extend_schema(
        summary="Characters similar to this one (duplicate hunting)",
        parameters=[SimilarQuerySerializer],
        responses={
            200: SimilarResponseSerializer,
            422: error_response("`no_identity`: the character has no analysed reference photo yet."),
        },
    )
    @action(detail=True, methods=["get"])
    def similar(self, request, pk=None):
        query = SimilarQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        embedder, results = services.characters_similar(
            character=self.get_object(),
            limit=query.validated_data["limit"],
            min_similarity=query.validated_data.get("min_similarity"),
        )
        return Response(
            {
                "embedder": embedder.name,
                "match_threshold": embedder.match_threshold,
                "results": SimilarCharacterSerializer(results, many=True, context={"request": request}).data,
            }
        )


IMPORT_IDEMPOTENCY_PARAMETER = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="A retry with the same key and archive returns the same import; a different archive answers 409.",
)
CHARACTER_PARAMETER = OpenApiParameter("character_pk", int, OpenApiParameter.PATH, description="Character id")


@extend_schema(parameters=[CHARACTER_PARAMETER])
class ReferenceViewSet(TenantViewSet):
    """Reference photos of one character. Adding one detects, checks and embeds the face."""

    serializer_class = ReferenceImageSerializer
    parser_classes = [MultiPartParser, FormParser]
    upload_limit = PHOTO_UPLOAD  # larger bodies are refused unread (alkemy/api/limits.py)
    pagination_class = None

    def character(self):
        return selectors.character_get(tenant=self.tenant, character_id=self.kwargs["character_pk"])

    def tenant_queryset(self):
        return selectors.reference_list(character=self.character())

    @extend_schema(summary="List reference photos", responses=ReferenceImageSerializer(many=True))
    def list(self, request, character_pk=None):
        serializer = self.get_serializer(self.get_queryset(), many=True)
        return Response(serializer.data)

    @extend_schema(
        summary="Add a reference photo",
        request={"multipart/form-data": ImageUploadSerializer},
        responses={201: ReferenceCreatedSerializer},
    )
    def create(self, request, character_pk=None):
        character = self.character()
        upload = ImageUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        added = services.reference_add(
            character=character, upload=upload.validated_data["image"], created_by=request.user
        )
        context = {**self.get_serializer_context(), "similar_characters": added.similar_characters}
        return Response(ReferenceCreatedSerializer(added.reference, context=context).data, status=201)

    @extend_schema(summary="One reference photo")
    def retrieve(self, request, character_pk=None, pk=None):
        reference = selectors.reference_get(character=self.character(), reference_id=pk)
        return Response(self.get_serializer(reference).data)

    @extend_schema(summary="Remove a reference photo (the identity is recomputed)", responses={204: None})
    def destroy(self, request, character_pk=None, pk=None):
        services.reference_delete(reference=selectors.reference_get(character=self.character(), reference_id=pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="Download the original photo", responses={(200, "image/*"): bytes})
    @action(detail=True, methods=["get"])
    def image(self, request, character_pk=None, pk=None):
        reference = selectors.reference_get(character=self.character(), reference_id=pk)
        content_type = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}[reference.image_format]
        return FileResponse(reference.file.open("rb"), content_type=content_type)


class FaceSearchView(TenantAPIView):
    parser_classes = [MultiPartParser, FormParser]
    upload_limit = PHOTO_UPLOAD
    # A search is a read that POSTs its photo: every role may search, viewers included.
    write_roles = frozenset(Role)

    @extend_schema(
        summary="Find the tenant's characters by a photo",
        request={"multipart/form-data": FaceSearchRequestSerializer},
        responses=FaceSearchResponseSerializer,
    )
    def post(self, request):
        form = FaceSearchRequestSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        found = services.faces_search(
            tenant=self.tenant,
            upload=form.validated_data["image"],
            limit=form.validated_data["limit"],
            min_similarity=form.validated_data.get("min_similarity"),
        )
        return Response(
            {
                "embedder": found.embedder.name,
                "match_threshold": found.embedder.match_threshold,
                "face": _face_json(found.face),
                "other_faces": [_face_json(face) for face in found.other_faces],
                "results": SimilarCharacterSerializer(found.results, many=True, context={"request": request}).data,
            }
        )


# --- bulk imports ---------------------------------------------------------------------------------


class CharacterImportCreateView(TenantAPIView):
    """POST /characters/import: a zip of one folder per character, enrolled by a job on the CPU cluster."""

    parser_classes = [MultiPartParser, FormParser]
    upload_limit = IMPORT_UPLOAD  # larger bodies are refused unread (alkemy/api/limits.py)

    @extend_schema(
        summary="Import characters from a zip (one folder of 1-5 photos per character)",
        request={"multipart/form-data": CharacterImportRequestSerializer},
        parameters=[IMPORT_IDEMPOTENCY_PARAMETER],
        responses={
            202: CharacterImportSerializer,
            400: error_response(
                "`invalid_archive` (not a zip), `archive_too_large` (too many files or unpacked bytes), "
                "`unsafe_archive` (a path leaving the archive, a symlink), `empty_archive`, `archive_required`."
            ),
            413: error_response("`archive_too_large`: the upload is over ALKEMY_IMPORT_MAX_ARCHIVE_BYTES."),
        },
    )
    def post(self, request):
        form = CharacterImportRequestSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        job, _ = import_jobs.import_submit(
            tenant=self.tenant,
            upload=form.validated_data["archive"],
            dry_run=form.validated_data["dry_run"],
            idempotency_key=request.headers.get("Idempotency-Key") or None,
            **self.requester(),
        )
        return Response(CharacterImportSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class CharacterImportViewSet(TenantViewSet, mixins.ListModelMixin, mixins.RetrieveModelMixin):
    """The tenant's character imports: status, progress, counts and the per-file report."""

    serializer_class = CharacterImportSerializer

    def tenant_queryset(self):
        return selectors.character_import_list(tenant=self.tenant)

    @extend_schema(summary="Cancel a queued or running import", request=None, responses=CharacterImportSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        return Response(self.get_serializer(import_jobs.import_cancel(job=self.get_object())).data)
