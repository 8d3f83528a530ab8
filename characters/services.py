"""What happens to characters: create, update, delete. Views and admin call these."""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, transaction
from django.utils.text import slugify

from alkemy.errors import AlkemyError, Conflict
from alkemy.tenancy.models import Tenant
from characters.models import Character

MAX_TAGS = 20
MAX_TAG_LENGTH = 50


def normalise_tags(tags: Iterable[str]) -> list[str]:
    """Lowercase, trimmed, unique, in first-seen order."""
    result: list[str] = []
    for raw in tags:
        tag = " ".join(str(raw).split()).lower()
        if not tag:
            continue
        if len(tag) > MAX_TAG_LENGTH:
            raise AlkemyError(
                f"Tag '{tag[:20]}…' is longer than {MAX_TAG_LENGTH} characters.", code="invalid_tag", field="tags"
            )
        if tag not in result:
            result.append(tag)
    if len(result) > MAX_TAGS:
        raise AlkemyError(f"A character has at most {MAX_TAGS} tags.", code="too_many_tags", field="tags")
    return result


def _unique_slug(*, tenant: Tenant, name: str) -> str:
    base = slugify(name)[:90] or "character"
    slug, n = base, 2
    while Character.objects.unscoped().filter(tenant=tenant, slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    return slug


def _save(character: Character) -> Character:
    try:
        with transaction.atomic():
            character.save()
    except IntegrityError:
        raise Conflict(
            f"Another character of this tenant already has the slug '{character.slug}'.",
            code="slug_taken",
            field="slug",
        ) from None
    return character


def character_create(
    *,
    tenant: Tenant,
    name: str,
    slug: str = "",
    description: str = "",
    tags: Iterable[str] = (),
    created_by=None,
    created_by_api_key=None,
) -> Character:
    name = name.strip()
    if not name:
        raise AlkemyError("A character needs a name.", code="invalid_name", field="name")
    character = Character(
        tenant=tenant,
        name=name,
        slug=slug or _unique_slug(tenant=tenant, name=name),
        description=description,
        tags=normalise_tags(tags),
        created_by=created_by,
        created_by_api_key=created_by_api_key,
    )
    return _save(character)


def character_update(*, character: Character, **changes) -> Character:
    """Apply `changes` (name, slug, description, tags, is_archived); unknown fields are a bug."""
    allowed = {"name", "slug", "description", "tags", "is_archived"}
    unknown = set(changes) - allowed
    if unknown:
        raise TypeError(f"character_update got unknown fields {sorted(unknown)}")
    if "name" in changes:
        changes["name"] = changes["name"].strip()
        if not changes["name"]:
            raise AlkemyError("A character needs a name.", code="invalid_name", field="name")
    if "tags" in changes:
        changes["tags"] = normalise_tags(changes["tags"])
    for field, value in changes.items():
        setattr(character, field, value)
    return _save(character)


def character_delete(*, character: Character) -> None:
    character.delete()
