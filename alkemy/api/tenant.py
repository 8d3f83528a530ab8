"""The caller's tenant: who it is, and its provider settings (the Gemini API key)."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response

from alkemy.api.base import TenantAPIView
from alkemy.api.fields import StrictCharField
from alkemy.crypto import secret_status
from alkemy.tenancy.models import MANAGE_ROLES
from alkemy.tenancy.services import tenant_set_gemini_key

TenantSerializer = inline_serializer(
    "Tenant",
    {
        "slug": serializers.CharField(),
        "name": serializers.CharField(),
        "role": serializers.CharField(),
        "gemini_api_key": serializers.CharField(
            allow_null=True, help_text="Masked; null when no readable key is stored (see gemini_api_key_status)"
        ),
        "gemini_api_key_status": serializers.ChoiceField(
            choices=["unset", "set", "unreadable"],
            help_text=(
                "unset: the global key is used; set: the tenant's own key is used; unreadable: the stored key "
                "cannot be decrypted since the server's encryption key changed, Gemini jobs fail "
                "provider_auth_failed until an owner or admin enters it again"
            ),
        ),
    },
)


class GeminiKeySerializer(serializers.Serializer):
    api_key = StrictCharField(allow_blank=True, help_text="Empty clears it (the global key is used)")


class TenantView(TenantAPIView):
    write_roles = MANAGE_ROLES

    def _body(self) -> dict:
        status, masked = secret_status(self.tenant.gemini_api_key_encrypted)
        return {
            "slug": self.tenant.slug,
            "name": self.tenant.name,
            "role": self.role,
            "gemini_api_key": masked,
            "gemini_api_key_status": status,
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
