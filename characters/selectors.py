"""How characters are found. Every selector takes the tenant: forgetting it is visible."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection
from django.db.models import Count, QuerySet
from django.utils import timezone

from alkemy.errors import NotFound
from alkemy.tenancy.models import Tenant
from characters.models import Character, CharacterImport, ReferenceImage


def character_list(*, tenant: Tenant) -> QuerySet[Character]:
    return Character.objects.filter(tenant=tenant).annotate(reference_count=Count("references"))


#: The fields of a `CharacterRows` tuple, in order (`CharacterSerializer.rows_representation` reads them).
CHARACTER_ROW = ("id", "name", "slug", "description", "tags", "is_archived", "reference_count", "created", "updated")

#: a timestamptz as DRF writes it for UTC (`datetime.isoformat()` with `Z`): `YYYY-MM-DDTHH:MM:SS[.ffffff]Z`, the
#: fraction only when there are microseconds. PostgreSQL formats it: no datetime parsed, shifted and printed
#: per value in Python (most of the character list's time per row, bench/load.py)
_UTC_TEXT = (
    "(to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS') || CASE"
    " WHEN date_trunc('second', {column} AT TIME ZONE 'UTC') = {column} AT TIME ZONE 'UTC'"
    " THEN 'Z' ELSE to_char({column} AT TIME ZONE 'UTC', '.US\"Z\"') END)"
)

#: `?ordering=` terms of the character list -> their column
_ORDER_COLUMNS = {
    "name": "c.name", "created_at": "c.created_at", "updated_at": "c.updated_at", "pk": "c.id", "id": "c.id"
}  # fmt: skip


@dataclass(frozen=True)
class CharacterQuery:
    """What the character list asks for, read and validated from the request (characters/api.py)."""

    search_terms: tuple[str, ...] = ()  # each must be in the name, description or slug (any case)
    tag: str | None = None
    archived: bool | None = None
    ordering: tuple[str, ...] = ("name", "pk")  # `-` reverses; names from _ORDER_COLUMNS


class CharacterRows:
    """The tenant's characters matching a `CharacterQuery`, as `CHARACTER_ROW` tuples, for a paginator.

    One hand-written statement reads a page and the total (`page_with_total`): what the filtered, ordered
    `character_list` asks of the ORM, without building and compiling that query on every request (most of
    the list's own time, bench/load.py), and counting references for the page's rows only (a subquery per
    row after the LIMIT instead of a join and GROUP BY over all the tenant's references).
    tests/test_load_paths.py checks it answers byte for byte what the ORM path does.
    """

    def __init__(self, *, tenant: Tenant, query: CharacterQuery) -> None:
        self.tenant_id = tenant.pk
        self.query = query

    def _where(self) -> tuple[str, list]:
        clauses, params = ["c.tenant_id = %s"], [self.tenant_id]
        if self.query.archived is not None:
            clauses.append("c.is_archived = %s")
            params.append(self.query.archived)
        if self.query.tag:
            clauses.append("c.tags @> %s::varchar(50)[]")
            params.append([self.query.tag])
        for term in self.query.search_terms:  # Django's icontains, as the ORM path writes it
            pattern = f"%{connection.ops.prep_for_like_query(term)}%"
            columns = ("c.name", "c.description", "c.slug")
            clauses.append("(" + " OR ".join(f"UPPER({column}::text) LIKE UPPER(%s)" for column in columns) + ")")
            params += [pattern] * len(columns)
        return " AND ".join(clauses), params

    def _order_by(self) -> str:
        terms = []
        for term in self.query.ordering:
            column = _ORDER_COLUMNS[term.lstrip("-")]  # KeyError for anything else: never request text
            terms.append(f"{column} DESC" if term.startswith("-") else f"{column} ASC")
        return ", ".join(terms)

    def _statement(self, *, total: bool) -> tuple[str, list]:
        where, params = self._where()
        if timezone.get_current_timezone_name() == "UTC":
            stamps = f"{_UTC_TEXT.format(column='c.created_at')}, {_UTC_TEXT.format(column='c.updated_at')}"
        else:
            stamps = "c.created_at, c.updated_at"
        return (
            "SELECT c.id, c.name, c.slug, c.description, c.tags, c.is_archived, "
            "(SELECT COUNT(*) FROM characters_referenceimage r WHERE r.character_id = c.id), "
            f"{stamps}{', COUNT(*) OVER ()' if total else ''} FROM characters_character c "
            f"WHERE {where} ORDER BY {self._order_by()} LIMIT %s OFFSET %s"
        ), params

    def _read(self, offset: int, limit: int, *, total: bool) -> list[tuple]:
        sql, params = self._statement(total=total)
        with connection.cursor() as cursor:
            cursor.execute(sql, [*params, limit, offset])
            return cursor.fetchall()

    def page_with_total(self, offset: int, limit: int) -> tuple[list[tuple], int | None]:
        """Rows `offset` to `offset + limit` and how many rows match in all (None when the page is empty)."""
        rows = self._read(offset, limit, total=True)
        if not rows:
            return [], None
        return [row[:-1] for row in rows], rows[0][-1]

    def count(self) -> int:
        where, params = self._where()
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT COUNT(*) FROM characters_character c WHERE {where}", params)
            return cursor.fetchone()[0]

    def __getitem__(self, window: slice) -> list[tuple]:
        start, stop = window.start or 0, window.stop
        return self._read(start, stop - start, total=False) if stop is not None and stop > start else []


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
