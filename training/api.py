"""LoRA endpoints: a character's LoRA versions (upload, list, select, delete) and style LoRAs."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.decorators import action
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.response import Response

from alkemy.api.base import TenantViewSet
from alkemy.api.limits import LORA_UPLOAD
from alkemy.api.parsers import JSONParser
from alkemy.errors import NotFound
from characters.selectors import character_get
from training import services
from training.models import BaseModel, LoraArtifact, StyleLora


class LoraArtifactSerializer(serializers.ModelSerializer):
    class Meta:
        model = LoraArtifact
        fields = ["id", "character", "version", "base_model", "lora_format", "rank", "trigger_token", "source",
                  "is_selected", "file_size", "sha256", "created_at"]  # fmt: skip
        read_only_fields = fields


class LoraUploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True, help_text="A .safetensors LoRA (diffusers/peft or kohya keys)")
    base_model = serializers.ChoiceField(choices=BaseModel.choices)
    trigger_token = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)
    select = serializers.BooleanField(required=False, default=True)


class StyleLoraSerializer(serializers.ModelSerializer):
    class Meta:
        model = StyleLora
        fields = ["id", "name", "base_model", "lora_format", "rank", "trigger_token", "file_size", "created_at"]
        read_only_fields = fields


class StyleLoraUploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)
    name = serializers.CharField(max_length=100)
    base_model = serializers.ChoiceField(choices=BaseModel.choices)
    trigger_token = serializers.CharField(required=False, allow_blank=True, default="", max_length=100)


CHARACTER_PARAMETER = OpenApiParameter("character_pk", int, OpenApiParameter.PATH, description="Character id")


@extend_schema(parameters=[CHARACTER_PARAMETER])
class CharacterLoraViewSet(TenantViewSet):
    """A character's LoRA versions; the selected one is what `method: "lora"` generations use."""

    serializer_class = LoraArtifactSerializer
    parser_classes = [MultiPartParser, FormParser, JSONParser]
    upload_limit = LORA_UPLOAD  # larger bodies are refused unread (alkemy/api/limits.py)
    pagination_class = None

    def character(self):
        return character_get(tenant=self.tenant, character_id=self.kwargs["character_pk"])

    def tenant_queryset(self):
        return LoraArtifact.objects.filter(tenant=self.tenant, character=self.character())

    def artifact(self, pk) -> LoraArtifact:
        pk = str(pk)
        found = self.get_queryset().filter(pk=int(pk)).first() if pk.isascii() and pk.isdigit() else None
        if found is None:
            raise NotFound("No such LoRA version.", code="lora_not_found")
        return found

    def list(self, request, character_pk=None):
        return Response(self.get_serializer(self.get_queryset(), many=True).data)

    @extend_schema(request={"multipart/form-data": LoraUploadSerializer}, responses={201: LoraArtifactSerializer})
    def create(self, request, character_pk=None):
        form = LoraUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        artifact = services.lora_upload(
            character=self.character(), upload=form.validated_data["file"],
            base_model=form.validated_data["base_model"], trigger_token=form.validated_data["trigger_token"],
            select=form.validated_data["select"], created_by=request.user,
        )  # fmt: skip
        return Response(self.get_serializer(artifact).data, status=status.HTTP_201_CREATED)

    def retrieve(self, request, character_pk=None, pk=None):
        return Response(self.get_serializer(self.artifact(pk)).data)

    @extend_schema(responses={204: None})
    def destroy(self, request, character_pk=None, pk=None):
        services.lora_delete(artifact=self.artifact(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses=LoraArtifactSerializer, summary="Use this version for generations")
    @action(detail=True, methods=["post"])
    def select(self, request, character_pk=None, pk=None):
        return Response(self.get_serializer(services.lora_select(artifact=self.artifact(pk))).data)


class StyleLoraViewSet(TenantViewSet):
    """The tenant's style LoRAs, combinable with a character LoRA (`params.style_lora`)."""

    serializer_class = StyleLoraSerializer
    parser_classes = [MultiPartParser, FormParser]
    upload_limit = LORA_UPLOAD
    pagination_class = None

    def tenant_queryset(self):
        return StyleLora.objects.filter(tenant=self.tenant)

    def list(self, request):
        return Response(self.get_serializer(self.get_queryset(), many=True).data)

    def style(self, pk) -> StyleLora:
        pk = str(pk)
        found = self.get_queryset().filter(pk=int(pk)).first() if pk.isascii() and pk.isdigit() else None
        if found is None:
            raise NotFound("No such style LoRA.", code="style_lora_not_found")
        return found

    def retrieve(self, request, pk=None):
        return Response(self.get_serializer(self.style(pk)).data)

    @extend_schema(responses={204: None})
    def destroy(self, request, pk=None):
        services.style_lora_delete(style=self.style(pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request={"multipart/form-data": StyleLoraUploadSerializer}, responses={201: StyleLoraSerializer})
    def create(self, request):
        form = StyleLoraUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        style = services.style_lora_upload(tenant=self.tenant, upload=form.validated_data["file"],
                                           name=form.validated_data["name"],
                                           base_model=form.validated_data["base_model"],
                                           trigger_token=form.validated_data["trigger_token"])  # fmt: skip
        return Response(self.get_serializer(style).data, status=status.HTTP_201_CREATED)
