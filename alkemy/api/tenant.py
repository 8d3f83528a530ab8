"""The caller's tenant: who it is, and its provider settings (the Gemini API key)."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from alkemy.api.base import TenantAPIView
from alkemy.crypto import decrypt, mask
from alkemy.tenancy.models import MANAGE_ROLES
from alkemy.tenancy.services import tenant_set_gemini_key

TenantSerializer = inline_serializer(
    "Tenant",
    {
        "slug": serializers.CharField(),
        "name": serializers.CharField(),
        "role": serializers.CharField(),
        "gemini_api_key": serializers.CharField(allow_null=True, help_text="Masked; null: the global key is used"),
    },
)


class GeminiKeySerializer(serializers.Serializer):
    api_key = serializers.CharField(allow_blank=True, help_text="Empty clears it (the global key is used)")


class TenantView(TenantAPIView):
    write_roles = MANAGE_ROLES

    def _body(self) -> dict:
        stored = self.tenant.gemini_api_key_encrypted
        return {
            "slug": self.tenant.slug,
            "name": self.tenant.name,
            "role": self.role,
            "gemini_api_key": mask(decrypt(stored)) if stored else None,
        }

    @extend_schema(summary="The caller's tenant", responses=TenantSerializer)
    def get(self, request):
        return Response(self._body())

    @extend_schema(
        summary="Set the tenant's own Gemini API key (stored encrypted, never shown back in full)",
        request=GeminiKeySerializer,
        responses=TenantSerializer,
    )
    def put(self, request):
        form = GeminiKeySerializer(data=request.data)
        form.is_valid(raise_exception=True)
        tenant_set_gemini_key(tenant=self.tenant, api_key=form.validated_data["api_key"])
        return Response(self._body())
