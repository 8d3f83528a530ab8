"""Stored files follow their rows: deleting a row removes its files once the delete has committed.

Files are deleted only **after commit** (a rolled-back delete keeps them), and only when **no
row still names them**: LoRA files are stored by content hash (`tenants/<id>/loras/<sha256>`), so
the same upload made twice, or as a character LoRA and a style LoRA, is one file shared by
several rows. Every service that deletes a row with a `FileField` (or a tenant, whose whole
media folder goes) calls one of the two functions here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import suppress

from django.apps import apps
from django.core.files.storage import default_storage
from django.db import models, transaction

logger = logging.getLogger(__name__)


def _file_fields() -> list[tuple[type[models.Model], str]]:
    return [
        (model, field.name)
        for model in apps.get_models()
        for field in model._meta.concrete_fields
        if isinstance(field, models.FileField)
    ]


def file_in_use(name: str) -> bool:
    """Whether any row of any model still stores this file name."""
    return any(
        model._base_manager.filter(**{field: name}).exists()  # _base_manager: never tenant-scoped
        for model, field in _file_fields()
    )


def _delete_now(names: Iterable[str]) -> None:
    for name in dict.fromkeys(n for n in names if n):
        if file_in_use(name):
            continue
        try:
            default_storage.delete(name)
        except OSError:  # a file that cannot be removed must not fail the request that deleted its row
            logger.exception("could not delete stored file %s", name)


def delete_files_on_commit(names: Iterable[str]) -> None:
    """After the current transaction commits, delete each file no row names any more."""
    names = [str(name) for name in names if name]
    if names:
        transaction.on_commit(lambda: _delete_now(names))


def _delete_tree(prefix: str) -> None:
    try:
        directories, files = default_storage.listdir(prefix)
    except (FileNotFoundError, NotADirectoryError):
        return
    for file_name in files:
        default_storage.delete(f"{prefix}/{file_name}")
    for directory in directories:
        _delete_tree(f"{prefix}/{directory}")
    if hasattr(default_storage, "path"):  # local storage keeps empty folders; object stores have none
        with suppress(OSError, NotImplementedError):
            os.rmdir(default_storage.path(prefix))


def tenant_media_prefix(tenant_id: int) -> str:
    """Every file of a tenant lives under this folder (see the models' `upload_to`)."""
    return f"tenants/{int(tenant_id)}"


def delete_tenant_media_on_commit(tenant_id: int) -> None:
    """After commit, remove the tenant's whole media folder (photos, outputs, LoRAs, checkpoints)."""
    prefix = tenant_media_prefix(tenant_id)
    transaction.on_commit(lambda: _delete_tree(prefix))
