from django.contrib import admin

from alkemy.tenancy.admin_base import TENANT_FILTER, TenantScopedAdmin
from training.models import LoraArtifact, StyleLora


@admin.register(LoraArtifact)
class LoraArtifactAdmin(TenantScopedAdmin):
    list_display = ["character", "version", "base_model", "lora_format", "rank", "is_selected", "source", "created_at"]
    list_filter = ["base_model", "source", TENANT_FILTER]
    search_fields = ["character__name", "trigger_token"]
    readonly_fields = ["file", "sha256", "file_size", "lora_format", "rank", "version", "source", "metadata",
                       "created_by", "created_at"]  # fmt: skip

    def has_add_permission(self, request):
        return False  # uploaded through the API, which validates the file


@admin.register(StyleLora)
class StyleLoraAdmin(TenantScopedAdmin):
    list_display = ["name", "tenant", "base_model", "lora_format", "rank", "created_at"]
    list_filter = ["base_model", TENANT_FILTER]
    readonly_fields = ["file", "sha256", "file_size", "lora_format", "rank", "created_at"]

    def has_add_permission(self, request):
        return False
