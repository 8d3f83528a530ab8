from django import forms
from django.contrib import admin

from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin, TenantScopedInline
from alkemy.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=500, assume_scheme="https")

    class Meta:
        model = WebhookEndpoint
        fields = ["tenant", "url", "events", "is_active"]

    def clean_url(self):
        from alkemy.webhooks.services import UnsafeWebhookUrl, check_url

        url = self.cleaned_data["url"]
        try:
            check_url(url)
        except UnsafeWebhookUrl as exc:
            raise forms.ValidationError(exc.message) from None
        return url


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(TenantScopedAdmin):
    form = WebhookEndpointForm
    manage_only = True  # like the API: owners and admins
    visible_to_managers_only = True  # a Slack-style URL is a bearer secret
    list_display = ["url", "tenant", "events", "is_active", "created_at"]
    list_filter = [TENANT_FILTER, "is_active"]
    search_fields = ["url"]
    readonly_fields = ["secret_hint", "created_at"]

    def delete_model(self, request, obj):
        from alkemy.webhooks.services import endpoint_delete

        endpoint_delete(endpoint=obj)  # locks the endpoint against in-flight delivery results

    def delete_queryset(self, request, queryset):
        from alkemy.webhooks.services import endpoint_delete

        for endpoint in self.editable_queryset(request, queryset):
            endpoint_delete(endpoint=endpoint)

    @admin.display(description="Secret")
    def secret_hint(self, obj):
        return "whsec_… (shown once, when the endpoint was created)" if obj.secret else "—"

    def save_model(self, request, obj, form, change):
        import secrets

        created = not obj.secret
        if created:
            obj.secret = "whsec_" + secrets.token_urlsafe(32)
        super().save_model(request, obj, form, change)
        if created:
            from django.contrib import messages

            messages.warning(request, f"Signing secret — copy it now, it is not shown again: {obj.secret}")


class WebhookAttemptInline(TenantScopedInline, admin.TabularInline):
    model = WebhookAttempt
    extra = 0
    can_delete = False
    fields = ["number", "status_code", "error", "duration_ms", "created_at"]
    readonly_fields = fields

    def get_queryset(self, request):
        return WebhookAttempt.objects.unscoped()

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(TenantScopedAdmin):
    manage_only = True
    visible_to_managers_only = True  # the delivery log names the endpoint URL
    list_display = [
        "event",
        "endpoint",
        "tenant",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
    ]
    list_filter = ["status", "event", TENANT_FILTER]
    search_fields = ["=id", "event", "endpoint__url"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in WebhookDelivery._meta.fields]
    inlines = [WebhookAttemptInline]

    def has_add_permission(self, request):
        return False
