"""How characters are found. Every selector takes the tenant: forgetting it is visible."""

from __future__ import annotations

from django.db.models import QuerySet

from alkemy.errors import NotFound
from alkemy.tenancy.models import Tenant
from characters.models import Character


def character_list(*, tenant: Tenant) -> QuerySet[Character]:
    return Character.objects.filter(tenant=tenant)


def character_get(*, tenant: Tenant, character_id) -> Character:
    try:
        return character_list(tenant=tenant).get(pk=int(character_id))
    except (Character.DoesNotExist, ValueError, TypeError):
        raise NotFound("No such character.", code="character_not_found") from None
