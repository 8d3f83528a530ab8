"""The job kinds the ledger can bill, without importing (or requiring) their apps.

A kind says how to read a job row: its model, the method it bills under, and its size in work
units (the denominator of the measured-duration medians the estimates use). Training jobs are
billed once `training.TrainingJob` exists; nothing here imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.apps import apps
from django.db import models

from usage.money import quantity

MEGAPIXEL = Decimal(1024 * 1024)


@dataclass(frozen=True)
class JobKindSpec:
    kind: str
    model_label: str

    def model(self) -> type[models.Model] | None:
        try:
            return apps.get_model(self.model_label)
        except LookupError:
            return None

    def method(self, job) -> str:
        if self.kind == "training":
            return f"train_{job.base_model}"
        return job.method

    def method_filter(self, method: str) -> dict | None:
        """Lookup for this kind's jobs of `method`, or None when the method is not of this kind."""
        if self.kind == "training":
            return {"base_model": method.removeprefix("train_")} if method.startswith("train_") else None
        return None if method.startswith("train_") else {"method": method}

    def work_units(self, job) -> Decimal:
        """steps x images x megapixels (Gemini: images; training: steps x megapixels)."""
        if self.kind == "training":
            return quantity(Decimal(job.steps) * Decimal(job.resolution) ** 2 / MEGAPIXEL)
        if is_remote_method(job.method):
            return quantity(job.num_images)
        return quantity(Decimal(job.steps * job.num_images) * Decimal(job.width * job.height) / MEGAPIXEL)

    def uses_device(self, job) -> bool:
        """Whether the job's time on a worker is billed (remote APIs bill their own meters instead)."""
        return self.kind == "training" or not is_remote_method(job.method)


GENERATION = JobKindSpec("generation", "generation.GenerationJob")
TRAINING = JobKindSpec("training", "training.TrainingJob")
JOB_KINDS: dict[str, JobKindSpec] = {spec.kind: spec for spec in (GENERATION, TRAINING)}


def job_kind_of(job) -> JobKindSpec:
    for spec in JOB_KINDS.values():
        if job._meta.label == spec.model_label:
            return spec
    raise ValueError(f"{job._meta.label} is not a job kind the ledger knows")


def installed_kinds() -> list[tuple[JobKindSpec, type[models.Model]]]:
    return [(spec, model) for spec in JOB_KINDS.values() if (model := spec.model()) is not None]


def is_remote_method(method: str) -> bool:
    """Methods served by a remote API on the CPU cluster (Gemini): no device time is billed."""
    from generation.methods import METHOD_CLUSTERS

    return METHOD_CLUSTERS.get(method, "gpu") != "gpu"
