"""How characters are found. Every selector takes the tenant: forgetting it is visible."""

from __future__ import annotations

from django.db.models import Count, QuerySet

from alkemy.errors import NotFound
from alkemy.tenancy.models import Tenant
from characters.models import Character, CharacterImport, ReferenceImage


def character_list(*, tenant: Tenant) -> QuerySet[Character]:
    return Character.objects.filter(tenant=tenant).annotate(reference_count=Count("references"))


def character_get(*, tenant: Tenant, character_id) -> Character:
    try:
        return character_list(tenant=tenant).get(pk=int(character_id))
    except (Character.DoesNotExist, ValueError, TypeError):
        raise NotFound("No such character.", code="character_not_found") from None


def reference_list(*, character: Character) -> QuerySet[ReferenceImage]:
    return ReferenceImage.objects.filter(tenant_id=character.tenant_id, character=character)


def reference_get(*, character: Character, reference_id) -> ReferenceImage:
    try:
        return reference_list(character=character).get(pk=int(reference_id))
    except (ReferenceImage.DoesNotExist, ValueError, TypeError):
        raise NotFound("No such reference photo.", code="reference_not_found") from None


def character_import_list(*, tenant: Tenant):
    """The tenant's bulk imports, newest first."""
    return CharacterImport.objects.filter(tenant=tenant).order_by("-queued_at", "-id")
