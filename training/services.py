"""LoRA artifacts: uploading a character's externally trained LoRA, choosing the version in use."""

from __future__ import annotations

import hashlib

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Max

from alkemy.errors import AlkemyError, Conflict
from alkemy.files import delete_files_on_commit
from alkemy.tenancy.models import Tenant
from characters.models import Character
from training.models import BaseModel, LoraArtifact, StyleLora, lora_upload_to


def _read_lora(upload) -> bytes:
    limit = settings.ALKEMY_MAX_LORA_BYTES
    if upload is None:
        raise AlkemyError("Send the LoRA as multipart field 'file'.", code="file_required", field="file")
    if getattr(upload, "size", 0) > limit:
        raise AlkemyError(f"The file is larger than {limit} bytes.", code="invalid_lora", field="file", status_code=422)
    data = upload.read(limit + 1)
    if len(data) > limit:
        raise AlkemyError(f"The file is larger than {limit} bytes.", code="invalid_lora", field="file", status_code=422)
    return data


def _inspect(data: bytes, base_model: str):
    from generation.lora import inspect_lora

    if base_model not in BaseModel.values:
        raise AlkemyError(
            f"base_model must be one of {BaseModel.values}.", code="invalid_parameter", field="base_model"
        )
    return inspect_lora(data, base_model=base_model, models_dir=settings.ALKEMY_MODELS_DIR)


def _store(instance, data: bytes) -> str:
    instance.sha256 = hashlib.sha256(data).hexdigest()
    return default_storage.save(lora_upload_to(instance, ""), ContentFile(data))


def lora_upload(
    *, character: Character, upload, base_model: str, trigger_token: str = "", select: bool = True, created_by=None
) -> LoraArtifact:
    """Validate an externally trained LoRA (safetensors, size, keys of the base model) and add it as
    the character's next version; selected for generations unless `select` is False."""
    data = _read_lora(upload)
    info = _inspect(data, base_model)
    artifact = LoraArtifact(
        tenant_id=character.tenant_id, character=character, base_model=base_model, file_size=len(data),
        lora_format=info.format, rank=info.rank, trigger_token=trigger_token.strip(), source="uploaded",
        metadata={"tensors": info.n_tensors, "components": list(info.components),
                  "target_modules": len(info.target_modules), "original_name": getattr(upload, "name", "")},
        created_by=created_by if getattr(created_by, "pk", None) else None,
    )  # fmt: skip
    stored = _store(artifact, data)
    try:
        with transaction.atomic():
            Character.objects.unscoped().select_for_update().filter(pk=character.pk).first()
            latest = LoraArtifact.objects.unscoped().filter(character=character).aggregate(v=Max("version"))["v"]
            artifact.version = (latest or 0) + 1
            artifact.file.name = stored
            if select:
                LoraArtifact.objects.unscoped().filter(character=character, is_selected=True).update(is_selected=False)
            artifact.is_selected = select
            artifact.save()
    except BaseException:
        default_storage.delete(stored)
        raise
    return artifact


def lora_select(*, artifact: LoraArtifact) -> LoraArtifact:
    """Make `artifact` the character's version in use. Concurrent selects (and uploads) of one character
    queue on its row, so the one-selected-per-character constraint never sees two at once."""
    with transaction.atomic():
        Character.objects.unscoped().select_for_update().filter(pk=artifact.character_id).first()
        LoraArtifact.objects.unscoped().filter(character_id=artifact.character_id, is_selected=True).update(
            is_selected=False
        )
        LoraArtifact.objects.unscoped().filter(pk=artifact.pk).update(is_selected=True)
    artifact.refresh_from_db()
    return artifact


def lora_in_use(*, artifact: LoraArtifact) -> bool:
    """Whether queued or running generations will still load this version's file."""
    from alkemy.jobs import JobStatus
    from generation.models import GenerationJob

    active = [JobStatus.QUEUED, JobStatus.RUNNING]
    return GenerationJob.objects.unscoped().filter(lora=artifact, status__in=active).exists()


def lora_delete(*, artifact: LoraArtifact) -> None:
    """Delete a LoRA version (finished jobs keep their outputs); refused while jobs wait to use it."""
    if lora_in_use(artifact=artifact):
        raise Conflict(
            "Queued or running generations use this LoRA version; cancel them or let them finish first.",
            code="lora_in_use",
            field="lora",
        )
    with transaction.atomic():
        artifact.delete()
        delete_files_on_commit([artifact.file.name])


def style_lora_delete(*, style: StyleLora) -> None:
    """Delete a style LoRA (finished jobs keep their outputs); refused while jobs wait to use it."""
    from alkemy.jobs import JobStatus
    from generation.models import GenerationJob

    active = [JobStatus.QUEUED, JobStatus.RUNNING]
    if GenerationJob.objects.unscoped().filter(style_lora=style, status__in=active).exists():
        raise Conflict(
            "Queued or running generations use this style LoRA; cancel them or let them finish first.",
            code="lora_in_use",
            field="style_lora",
        )
    with transaction.atomic():
        style.delete()
        delete_files_on_commit([style.file.name])


def style_lora_upload(*, tenant: Tenant, upload, name: str, base_model: str, trigger_token: str = "") -> StyleLora:
    data = _read_lora(upload)
    info = _inspect(data, base_model)
    style = StyleLora(
        tenant=tenant, name=name.strip(), base_model=base_model, file_size=len(data), lora_format=info.format,
        rank=info.rank, trigger_token=trigger_token.strip(),
    )  # fmt: skip
    stored = _store(style, data)
    style.file.name = stored
    try:
        with transaction.atomic():
            style.save()
    except IntegrityError:
        default_storage.delete(stored)
        raise Conflict(f"A style LoRA named '{name}' exists already.", code="style_lora_exists", field="name") from None
    return style
