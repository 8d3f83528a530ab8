"""Reads of generation jobs and their outputs. Every function is given the tenant."""

from __future__ import annotations

from django.db.models import QuerySet

from generation.models import GeneratedImage


def character_outputs(*, tenant_id: int, character_id: int, limit: int = 24) -> QuerySet[GeneratedImage]:
    """A character's newest rendered images (with their job), newest first."""
    return (
        GeneratedImage.objects.unscoped()
        .filter(tenant_id=tenant_id, job__character_id=character_id)
        .select_related("job")
        .order_by("-created_at", "-index")[:limit]
    )
