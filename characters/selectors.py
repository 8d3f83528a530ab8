"""How characters are found. Every selector takes the tenant: forgetting it is visible."""

from __future__ import annotations

from django.db.models import Count, F, Func, QuerySet, TextField
from django.utils import timezone

from alkemy.errors import NotFound
from alkemy.tenancy.models import Tenant
from characters.models import Character, CharacterImport, ReferenceImage


def character_list(*, tenant: Tenant) -> QuerySet[Character]:
    return Character.objects.filter(tenant=tenant).annotate(reference_count=Count("references"))


class _UtcIsoText(Func):
    """A timestamptz as DRF writes it for UTC (`datetime.isoformat()` with `Z`): `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`,
    the fraction only when there are microseconds. PostgreSQL formats it: no datetime parsed, shifted, printed
    per value in Python (most of the character list's time per row, bench/load.py). Its expression is written
    four times: a column only (an expression with SQL parameters would need them four times)."""

    template = (
        "(to_char((%(expressions)s) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE"
        " WHEN date_trunc('second', (%(expressions)s) AT TIME ZONE 'UTC') = (%(expressions)s) AT TIME ZONE 'UTC'"
        " THEN 'Z' ELSE to_char((%(expressions)s) AT TIME ZONE 'UTC', '.US\"Z\"') END)"
    )
    output_field = TextField()


#: The fields of a `character_rows` tuple, in order (`CharacterSerializer.rows_representation` reads them).
CHARACTER_ROW = ("id", "name", "slug", "description", "tags", "is_archived", "reference_count", "created", "updated")


def character_rows(characters: QuerySet[Character]) -> QuerySet:
    """`characters` (from `character_list`, filtered and ordered) as plain tuples of `CHARACTER_ROW`: the
    list's page without a model instance per row. The timestamps come as DRF's text when the current time
    zone is UTC (the deployment's), else as datetimes."""
    if timezone.get_current_timezone_name() == "UTC":
        characters = characters.annotate(created=_UtcIsoText(F("created_at")), updated=_UtcIsoText(F("updated_at")))
    else:
        characters = characters.annotate(created=F("created_at"), updated=F("updated_at"))
    return characters.values_list(*CHARACTER_ROW)


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
