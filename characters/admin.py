from django.contrib import admin

from alkemy.tenancy.admin_base import TenantScopedAdmin
from characters.models import Character


@admin.register(Character)
class CharacterAdmin(TenantScopedAdmin):
    list_display = ["name", "slug", "tenant", "tag_list", "is_archived", "updated_at"]
    list_filter = ["tenant", "is_archived"]
    search_fields = ["name", "slug", "description"]
    prepopulated_fields = {"slug": ["name"]}
    readonly_fields = ["created_by", "created_by_api_key", "created_at", "updated_at"]

    @admin.display(description="Tags")
    def tag_list(self, obj):
        return ", ".join(obj.tags)
