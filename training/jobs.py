"""Submitting, cancelling and describing LoRA training jobs (the API, admin and `train_lora` call these).

A training job follows the lifecycle of `alkemy.jobs` (queued → running → succeeded/failed/canceled,
leases, the reaper) and runs on the GPU cluster (`training.worker`). Everything a worker would trip
over is refused here first, with the offending field: the character and its reference photos, the
ranges, the base model's weights.
"""

from __future__ import annotations

import secrets

from django.conf import settings
from django.db import IntegrityError, transaction

from alkemy.errors import AlkemyError, NotFound
from alkemy.jobs import JobStatus, idempotent_match, job_request_cancel, request_hash
from alkemy.tenancy.models import Tenant
from characters.models import Character, ReferenceImage
from training.models import BaseModel, TrainingJob
from usage.services import usage_admit

GPU_CLUSTER = "gpu"
MAX_SEED = 2**31 - 1
MAX_RANK = 128
DEFAULT_RANK = 16
DEFAULT_STEPS = {"sdxl": 1000, "flux": 1000}
DEFAULT_LEARNING_RATE = {"sdxl": 1e-4, "flux": 1e-4}
DEFAULT_RESOLUTION = 1024
#: smallest and largest training resolution per base (multiples of 64)
RESOLUTION_LIMITS = {"sdxl": (64, 1536), "flux": (64, 2048)}
LR_SCHEDULES = ("constant", "cosine")
TRIGGER_PREFIX = "ohwx_"


def _invalid(message: str, field: str, code: str = "invalid_parameter") -> AlkemyError:
    return AlkemyError(message, code=code, field=field)


def default_trigger_token(character: Character) -> str:
    """`ohwx_<slug>`: a rare token plus the character's slug, one word for the tokenizers."""
    return TRIGGER_PREFIX + character.slug.replace("-", "_")


def max_training_steps() -> int:
    return int(getattr(settings, "ALKEMY_TRAINING_MAX_STEPS", 10_000))


def training_submit(
    *,
    tenant: Tenant,
    character: Character,
    base_model: str,
    steps: int | None = None,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    learning_rate: float | None = None,
    lr_schedule: str = "constant",
    warmup_steps: int | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    trigger_token: str | None = None,
    captions: dict | None = None,
    seed: int | None = None,
    validation_prompt: str = "",
    idempotency_key: str | None = None,
    requested_by=None,
    requested_by_api_key=None,
    enqueue: bool = True,
    dry_run: bool = False,
) -> tuple[TrainingJob, bool]:
    """Validate the request, store the job and enqueue it after commit. Returns (job, created).

    `enqueue=False` leaves the job for the caller to run in its own process (`manage.py train_lora`).
    `dry_run=True` validates the same way and returns `(usage.services.Quote, False)` instead: the
    estimate and the budget and job-limit verdicts, with no job.

    With an idempotency key, a retry with the same body returns the first job (created=False); the same
    key with another body is a 409 `idempotency_key_reused`.
    """
    fingerprint = request_hash(
        {"character": character.pk, "base_model": base_model, "steps": steps, "rank": rank, "alpha": alpha,
         "learning_rate": learning_rate, "lr_schedule": lr_schedule, "warmup_steps": warmup_steps,
         "resolution": resolution, "trigger_token": trigger_token, "captions": captions, "seed": seed,
         "validation_prompt": validation_prompt}
    )  # fmt: skip
    if character.tenant_id != tenant.pk:
        raise NotFound("No such character.", code="character_not_found")
    if base_model not in BaseModel.values:
        raise _invalid(f"base_model must be one of {', '.join(BaseModel.values)}.", "base_model")
    steps = DEFAULT_STEPS[base_model] if steps is None else steps
    limit = max_training_steps()
    if isinstance(steps, bool) or not 1 <= steps <= limit:
        raise _invalid(f"steps must be between 1 and {limit}.", "steps")
    if isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise _invalid(f"rank must be between 1 and {MAX_RANK}.", "rank")
    alpha = float(rank if alpha is None else alpha)
    if not 0 < alpha <= 4 * MAX_RANK:
        raise _invalid(f"alpha must be above 0 and at most {4 * MAX_RANK}.", "alpha")
    learning_rate = DEFAULT_LEARNING_RATE[base_model] if learning_rate is None else float(learning_rate)
    if not 0 < learning_rate <= 0.1:
        raise _invalid("learning_rate must be above 0 and at most 0.1.", "learning_rate")
    if lr_schedule not in LR_SCHEDULES:
        raise _invalid(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}.", "lr_schedule")
    warmup_steps = min(100, steps // 10) if warmup_steps is None else warmup_steps
    if isinstance(warmup_steps, bool) or warmup_steps < 0 or (warmup_steps and warmup_steps >= steps):
        raise _invalid("warmup_steps must be below steps.", "warmup_steps")
    low, high = RESOLUTION_LIMITS[base_model]
    if isinstance(resolution, bool) or resolution % 64 or not low <= resolution <= high:
        raise _invalid(f"resolution must be a multiple of 64 between {low} and {high} for {base_model}.", "resolution")
    trigger_token = (trigger_token or "").strip() or default_trigger_token(character)
    if len(trigger_token) > 100 or any(c.isspace() for c in trigger_token) or "\x00" in trigger_token:
        raise _invalid("trigger_token must be one word of at most 100 characters.", "trigger_token")
    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    if not 0 <= seed <= MAX_SEED:
        raise _invalid(f"seed must be between 0 and {MAX_SEED}.", "seed")
    if len(validation_prompt) > 4000 or "\x00" in validation_prompt:
        raise _invalid("validation_prompt must be at most 4000 characters.", "validation_prompt")
    if idempotency_key is not None and len(idempotency_key) > 200:
        raise _invalid("The Idempotency-Key header is longer than 200 characters.", "Idempotency-Key",
                       "invalid_idempotency_key")  # fmt: skip
    references = list(ReferenceImage.objects.unscoped().filter(character=character).values_list("pk", flat=True))
    if not references:
        raise AlkemyError(
            f"Character '{character.name}' has no reference photo to train on; add one first.",
            code="no_references", field="character", status_code=422,
        )  # fmt: skip
    captions = _checked_captions(captions, references)
    _require_base_weights(base_model)

    if dry_run:
        from usage.services import usage_quote

        draft = TrainingJob(tenant=tenant, character=character, base_model=base_model, steps=steps, rank=rank,
                            resolution=resolution, total_steps=steps)  # fmt: skip
        return usage_quote(job=draft), False

    if idempotency_key:
        existing = idempotent_match(TrainingJob, tenant=tenant, key=idempotency_key, fingerprint=fingerprint)
        if existing:
            return existing, False
    try:
        with transaction.atomic():
            job = TrainingJob.objects.unscoped().create(
                tenant=tenant, character=character, base_model=base_model, steps=steps, rank=rank, alpha=alpha,
                learning_rate=learning_rate, lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                resolution=resolution, trigger_token=trigger_token, captions=captions, seed=seed,
                validation_prompt=validation_prompt.strip(), total_steps=steps,
                idempotency_key=idempotency_key or None, request_hash=fingerprint,
                requested_by=requested_by if getattr(requested_by, "pk", None) else None,
                requested_by_api_key=requested_by_api_key,
            )  # fmt: skip
            usage_admit(job=job)  # budget and job limits (402 / 429), in the transaction that created the job
            notify(job, JobStatus.QUEUED)
            if enqueue:
                transaction.on_commit(lambda: enqueue_training(job.pk))
    except IntegrityError:
        existing = (
            idempotent_match(TrainingJob, tenant=tenant, key=idempotency_key, fingerprint=fingerprint)
            if idempotency_key
            else None
        )
        if existing is None:
            raise
        return existing, False
    return job, True


def _checked_captions(captions, reference_ids: list[int]) -> dict:
    """{reference id (as a string): caption}; every id must be one of the character's references."""
    if not captions:
        return {}
    if not isinstance(captions, dict):
        raise _invalid("captions must be an object of reference id → caption.", "captions")
    checked = {}
    for key, caption in captions.items():
        key = str(key)
        if not key.isascii() or not key.isdigit() or int(key) not in reference_ids:
            raise _invalid(f"captions names {key!r}, which is not a reference photo of the character.", "captions")
        if not isinstance(caption, str) or not caption.strip() or len(caption) > 1000 or "\x00" in caption:
            raise _invalid(f"captions[{key}] must be a non-empty text of at most 1000 characters.", "captions")
        checked[key] = caption.strip()
    return checked


def _require_base_weights(base_model: str) -> None:
    """The base model's files as `check_models` knows them, or a 503 on the field."""
    from generation.lora.bases import require_base
    from generation.methods.base import ModelMissing

    try:
        require_base(settings.ALKEMY_MODELS_DIR, base_model)
    except ModelMissing as missing:
        raise AlkemyError(
            missing.message.replace("LoRA generation", "LoRA training"),
            code="model_missing", field="base_model", details=missing.details, status_code=503,
        ) from None  # fmt: skip


def enqueue_training(job_id: int) -> None:
    """Hand the job to the GPU cluster. Safe to call more than once: the claim is conditional."""
    from django_q.tasks import async_task

    async_task("training.tasks.run_training_job", job_id, cluster=GPU_CLUSTER, task_name=f"training-{job_id}")


def training_cancel(*, job: TrainingJob) -> TrainingJob:
    """Cancel a queued job at once; a running one stops before its next step and keeps no LoRA."""
    with transaction.atomic():
        _, canceled_now = job_request_cancel(TrainingJob, job.pk)
        if canceled_now:  # a running job's worker reports its own cancellation
            notify(job, JobStatus.CANCELED)
    job.refresh_from_db()
    return job


def job_payload(job: TrainingJob) -> dict:
    """The job as webhooks send it."""
    return {
        "id": job.pk,
        "object": "training",
        "status": job.status,
        "character": job.character_id,
        "base_model": job.base_model,
        "steps": job.steps,
        "progress": round(job.progress, 4),
        "current_step": job.current_step,
        "loss": job.loss,
        "attempt": job.attempt,
        "resumed_from_step": job.resumed_from_step,
        "lora": job.lora_id,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "queued_at": job.queued_at.isoformat() if job.queued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def notify(job: TrainingJob, status: str) -> None:
    """Emit the `training.<status>` webhook event (deliveries are sent after commit)."""
    from alkemy.webhooks.services import emit

    job.refresh_from_db()
    emit(tenant_id=job.tenant_id, event=f"training.{status}", payload=job_payload(job))
