"""Tenants, who belongs to them (memberships with roles) and how machines reach them (API keys)."""

import hashlib
import hmac

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models

from alkemy.tenancy.scoping import TenantOwnedModel


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer (read-only)"


WRITE_ROLES = frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER})
MANAGE_ROLES = frozenset({Role.OWNER, Role.ADMIN})

slug_validator = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$",
    "Use lowercase letters, digits and hyphens (1-63 characters, not starting or ending with a hyphen).",
)


class Tenant(models.Model):
    """A studio: the unit of isolation, billing and access."""

    slug = models.SlugField(max_length=63, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True, help_text="Inactive tenants cannot use the API.")
    gemini_api_key_encrypted = models.TextField(
        blank=True, editable=False, help_text="The tenant's own Gemini API key, encrypted at rest"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.name or self.slug


class Membership(TenantOwnedModel):
    """A user's role in a tenant. Staff users see a tenant in admin only through a membership."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant__slug", "user__username"]
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="membership_unique_user_per_tenant")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant.slug} ({self.role})"


API_KEY_PREFIX_LENGTH = 8


def hash_api_key_secret(secret: str) -> str:
    """SHA-256 keyed with SECRET_KEY: keys are random 256-bit tokens, so a slow KDF buys nothing."""
    return hmac.new(settings.SECRET_KEY.encode(), secret.encode(), hashlib.sha256).hexdigest()


class ApiKey(TenantOwnedModel):
    """A machine credential of one tenant: `Api-Key ak_<prefix>_<secret>`; only a hash is stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    role = models.CharField(
        max_length=16, choices=Role.choices, default=Role.MEMBER, help_text="Viewer keys are read-only."
    )
    prefix = models.CharField(max_length=API_KEY_PREFIX_LENGTH, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} (ak_{self.prefix}_…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def secret_matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.secret_hash, hash_api_key_secret(secret))
