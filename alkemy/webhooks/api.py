"""Webhook endpoints of the tenant: only owners and admins may see or manage them.

An endpoint URL can be a bearer secret (Slack-style incoming webhooks) and delivery logs carry
job payloads, so members and viewers get 403 even for reads.
"""

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, serializers
from rest_framework.response import Response

from alkemy.api.base import TenantModelViewSet
from alkemy.api.fields import StrictBooleanField, StrictModelSerializer
from alkemy.errors import NotFound
from alkemy.tenancy.models import MANAGE_ROLES
from alkemy.webhooks import services
from alkemy.webhooks.models import EVENTS, WebhookDelivery, WebhookEndpoint


class WebhookEndpointSerializer(StrictModelSerializer):
    events = serializers.ListField(child=serializers.ChoiceField(choices=EVENTS), required=False)
    is_active = StrictBooleanField(required=False)
    secret_hint = serializers.SerializerMethodField()

    class Meta:
        model = WebhookEndpoint
        fields = ["id", "url", "events", "is_active", "secret_hint", "created_at"]
        read_only_fields = ["id", "secret_hint", "created_at"]

    def get_secret_hint(self, obj) -> str:
        return "whsec_…"  # nothing of the secret itself: it was shown once, at creation


class WebhookEndpointCreatedSerializer(WebhookEndpointSerializer):
    secret = serializers.CharField(read_only=True, help_text="Shown once: keep it to verify signatures")

    class Meta(WebhookEndpointSerializer.Meta):
        fields = [*WebhookEndpointSerializer.Meta.fields, "secret"]


class WebhookDeliverySerializer(serializers.ModelSerializer):
    class Meta:
        model = WebhookDelivery
        fields = ["id", "event", "status", "attempts", "last_status_code", "last_error", "next_attempt_at",
                  "delivered_at", "created_at"]  # fmt: skip


class ManagersOnly(exceptions.PermissionDenied):
    default_code = "permission_denied"  # one of the documented 403 codes; the message says who may
    default_detail = "Only owners and admins of the tenant may see or change webhooks."


class WebhookEndpointViewSet(TenantModelViewSet):
    """Signed `POST`s of job state changes. Header `X-Alkemy-Signature: t=<ts>,v1=<HMAC-SHA256(secret, ts.body)>`.
    Owners and admins only, reads included."""

    serializer_class = WebhookEndpointSerializer
    write_roles = MANAGE_ROLES
    pagination_class = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        if self.role not in MANAGE_ROLES:
            raise ManagersOnly()

    def tenant_queryset(self):
        return WebhookEndpoint.objects.filter(tenant=self.tenant)

    def get_object(self):
        pk = self.kwargs["pk"]
        endpoint = self.get_queryset().filter(pk=int(pk)).first() if pk.isascii() and pk.isdigit() else None
        if endpoint is None:
            raise NotFound("No such webhook endpoint.", code="webhook_not_found")
        return endpoint

    @extend_schema(responses={201: WebhookEndpointCreatedSerializer})
    def create(self, request, *args, **kwargs):
        form = self.get_serializer(data=request.data)
        form.is_valid(raise_exception=True)
        endpoint = services.endpoint_create(
            tenant=self.tenant, url=form.validated_data["url"], events=form.validated_data.get("events")
        )
        return Response(WebhookEndpointCreatedSerializer(endpoint).data, status=201)

    def perform_update(self, serializer):
        if "url" in serializer.validated_data:
            services.check_url(serializer.validated_data["url"])
        serializer.save()

    def perform_destroy(self, instance):
        services.endpoint_delete(endpoint=instance)

    @extend_schema(responses=WebhookDeliverySerializer(many=True))
    def deliveries(self, request, pk=None):
        endpoint = self.get_object()
        recent = WebhookDelivery.objects.filter(tenant=self.tenant, endpoint=endpoint)[:100]
        return Response(WebhookDeliverySerializer(recent, many=True).data)
