"""The character registry: characters of a tenant, their reference photos and face identities."""

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models

from alkemy.tenancy.scoping import TenantOwnedModel


class Character(TenantOwnedModel):
    """A recurring person of a studio's productions, identified by the faces in its references."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="characters")
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100)
    description = models.TextField(blank=True)
    tags = ArrayField(models.CharField(max_length=50), default=list, blank=True)
    is_archived = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_api_key = models.ForeignKey(
        "tenancy.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["tenant", "slug"], name="character_unique_slug_per_tenant")]
        indexes = [models.Index(fields=["tenant", "is_archived", "name"], name="character_tenant_list_idx")]

    def __str__(self) -> str:
        return self.name
