"""Tenant, membership and API key services."""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from alkemy.errors import AlkemyError, Conflict
from alkemy.tenancy.models import (
    API_KEY_PREFIX_LENGTH,
    ApiKey,
    Membership,
    Role,
    Tenant,
    hash_api_key_secret,
    slug_validator,
)

API_KEY_SCHEME = "ak"
LAST_USED_WRITE_INTERVAL = timedelta(seconds=60)


class ApiKeyRejected(AlkemyError):
    status_code = 401


def tenant_create(*, slug: str, name: str = "") -> Tenant:
    from django.core.exceptions import ValidationError

    try:
        slug_validator(slug)
    except ValidationError as exc:
        raise AlkemyError(exc.messages[0], code="invalid_slug", field="slug") from None
    try:
        with transaction.atomic():
            return Tenant.objects.create(slug=slug, name=name or slug)
    except IntegrityError:
        raise Conflict(f"A tenant with slug '{slug}' already exists.", code="tenant_exists", field="slug") from None


def membership_set(*, tenant: Tenant, user: AbstractBaseUser, role: str = Role.MEMBER) -> Membership:
    membership, _ = Membership.objects.unscoped().update_or_create(tenant=tenant, user=user, defaults={"role": role})
    return membership


def tenants_of_user(user) -> list[Tenant]:
    """Tenants the user is a member of (superusers: still only memberships; admin lifts that itself)."""
    if not getattr(user, "is_authenticated", False):
        return []
    return list(Tenant.objects.filter(memberships__user=user).distinct())


def user_role_in(*, user, tenant: Tenant) -> str | None:
    membership = Membership.objects.unscoped().filter(user=user, tenant=tenant).first()
    if membership:
        return membership.role
    if getattr(user, "is_superuser", False):
        return Role.OWNER
    return None


def api_key_create(*, tenant: Tenant, name: str, role: str = Role.MEMBER, created_by=None) -> tuple[ApiKey, str]:
    """Create a key; returns (key, plaintext). The plaintext is shown once and never stored."""
    for _ in range(5):
        prefix = secrets.token_hex(API_KEY_PREFIX_LENGTH // 2)
        secret = secrets.token_urlsafe(32)
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.unscoped().create(
                    tenant=tenant,
                    name=name,
                    role=role,
                    prefix=prefix,
                    secret_hash=hash_api_key_secret(secret),
                    created_by=created_by,
                )
        except IntegrityError:
            continue  # prefix collision, astronomically rare: draw again
        return api_key, f"{API_KEY_SCHEME}_{prefix}_{secret}"
    raise RuntimeError("could not draw a unique API key prefix")


def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_key_authenticate(raw_key: str) -> ApiKey:
    """Resolve `ak_<prefix>_<secret>` to an active key of an active tenant, else ApiKeyRejected."""
    parts = raw_key.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_SCHEME or len(parts[1]) != API_KEY_PREFIX_LENGTH or not parts[2]:
        raise ApiKeyRejected("The API key is malformed; expected 'ak_<prefix>_<secret>'.", code="malformed_api_key")
    _, prefix, secret = parts
    api_key = ApiKey.objects.unscoped().select_related("tenant").filter(prefix=prefix).first()
    if api_key is None or not api_key.secret_matches(secret):
        raise ApiKeyRejected("The API key is not valid.", code="invalid_api_key")
    if api_key.is_revoked:
        raise ApiKeyRejected("The API key has been revoked.", code="revoked_api_key")
    if not api_key.tenant.is_active:
        raise ApiKeyRejected("The tenant of this API key is inactive.", code="tenant_inactive")

    now = timezone.now()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_WRITE_INTERVAL:
        ApiKey.objects.unscoped().filter(pk=api_key.pk).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key


def tenant_set_gemini_key(*, tenant: Tenant, api_key: str | None) -> Tenant:
    """Store (encrypted) or clear the tenant's own Gemini API key."""
    from alkemy.crypto import encrypt

    api_key = (api_key or "").strip()
    if api_key and (len(api_key) < 20 or " " in api_key):
        raise AlkemyError("That does not look like a Gemini API key.", code="invalid_api_key", field="api_key")
    tenant.gemini_api_key_encrypted = encrypt(api_key) if api_key else ""
    tenant.save(update_fields=["gemini_api_key_encrypted"])
    return tenant


def tenant_gemini_key(tenant: Tenant) -> str | None:
    """The tenant's Gemini key in clear (for the worker only), or None to use the global one.

    A stored key that the configured encryption keys cannot read (the encryption key was rotated
    without keeping the old one) raises `provider_auth_failed`: never fall back to the global key,
    which would bill the operator for the tenant's jobs.
    """
    from alkemy.crypto import SecretUnreadable, decrypt

    if not tenant.gemini_api_key_encrypted:
        return None
    try:
        return decrypt(tenant.gemini_api_key_encrypted)
    except SecretUnreadable:
        raise AlkemyError(
            "The studio's Gemini API key can no longer be read (the server's encryption key changed): "
            "an owner or admin must enter the key again (PUT /api/v1/tenant, or the tenant page in admin).",
            code="provider_auth_failed",
            status_code=502,
            details={"provider": "gemini", "reason": "tenant_key_unreadable"},
        ) from None


def tenant_delete(*, tenant: Tenant) -> None:
    """Delete a tenant with everything it owns; its whole media folder goes after commit."""
    from alkemy.files import delete_tenant_media_on_commit

    with transaction.atomic():
        tenant_id = tenant.pk
        tenant.delete()
        delete_tenant_media_on_commit(tenant_id)
