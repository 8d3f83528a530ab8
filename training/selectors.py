"""Reads of LoRA versions and trainings. Every function is given the tenant."""

from __future__ import annotations

from django.db.models import QuerySet

from training.models import LoraArtifact


def character_lora_versions(*, tenant_id: int, character_id: int) -> QuerySet[LoraArtifact]:
    """A character's LoRA versions, newest first."""
    return LoraArtifact.objects.unscoped().filter(tenant_id=tenant_id, character_id=character_id).order_by("-version")
