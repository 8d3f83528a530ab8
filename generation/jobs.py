"""Submitting, cancelling and describing generation jobs (the API and admin call these)."""

from __future__ import annotations

import json
import logging
import math
import re

from django.conf import settings
from django.db import IntegrityError, transaction

from alkemy.errors import AlkemyError, Conflict, NotFound
from alkemy.jobs import JobStatus, idempotent_match, job_request_cancel, request_hash
from alkemy.tenancy.models import Tenant
from characters.faces import resolve_embedder_name
from characters.models import Character
from generation.gemini.client import allowed_model
from generation.methods import DEFAULT_METHOD, DEFAULT_STEPS, IDENTITY_METHODS, METHOD_CLUSTERS, METHODS
from generation.models import GeneratedImage, GenerationJob
from generation.references import identity_check, method_embedder
from usage.services import usage_admit

logger = logging.getLogger(__name__)

GPU_CLUSTER = "gpu"
MAX_SEED = 2**31 - 1  # Gemini and several schedulers take 32-bit seeds
MAX_IDEMPOTENCY_KEY_LENGTH = 200
#: method parameters are a handful of numbers and short lists (pose keypoints); these bound hostile ones
MAX_PARAMS_DEPTH = 8
MAX_PARAMS_BYTES = 16 * 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
#: filled in by the worker from the database, never taken from a request
RESERVED_PARAMS = frozenset(
    {"lora_path", "lora_id", "style_lora_path", "style_lora_id", "base_model", "trigger_token", "style_trigger_token"}
)


def _invalid(message: str, field: str, code: str = "invalid_parameter") -> AlkemyError:
    return AlkemyError(message, code=code, field=field)


def generation_submit(
    *,
    tenant: Tenant,
    character: Character,
    prompt: str,
    method: str = DEFAULT_METHOD,
    negative_prompt: str = "",
    width: int = 1024,
    height: int = 1024,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    params: dict | None = None,
    idempotency_key: str | None = None,
    requested_by=None,
    requested_by_api_key=None,
    dry_run: bool = False,
) -> tuple[GenerationJob, bool]:
    """Validate everything up front, store the job, enqueue it after commit. Returns (job, created).

    The tenant's budget and job limits admit the job in the same transaction (`usage.services.usage_admit`):
    402 `budget_exceeded` or 429 `too_many_jobs` leave nothing behind. `dry_run=True` validates the same
    way and returns `(usage.services.Quote, False)` instead: the estimate and verdicts, with no job.

    With an idempotency key, a retry with the same body returns the first job (created=False);
    the same key with a different body is a 409.
    """
    import secrets

    params = _checked_params(params)  # first: the fingerprint below serialises them
    # What the client sent, before defaults are filled in: a retry sends the same body.
    fingerprint = request_hash(
        {"character": character.pk, "method": method, "prompt": prompt, "negative_prompt": negative_prompt,
         "width": width, "height": height, "steps": steps, "guidance": guidance, "seed": seed,
         "num_images": num_images, "params": params or {}}
    )  # fmt: skip
    if character.tenant_id != tenant.pk:
        raise NotFound("No such character.", code="character_not_found")
    if method not in METHODS:
        raise _invalid(f"Unknown method '{method}'; known: {', '.join(METHODS)}.", "method", "unknown_method")
    if not prompt or not prompt.strip():
        raise _invalid("A prompt is required.", "prompt")
    limit = settings.ALKEMY_MAX_IMAGE_SIDE
    for name, value in (("width", width), ("height", height)):
        if not 64 <= value <= limit or value % 16:
            raise _invalid(f"{name} must be a multiple of 16 between 64 and {limit}.", name)
    steps = DEFAULT_STEPS[method] if steps is None else steps
    if not 1 <= steps <= settings.ALKEMY_MAX_STEPS:
        raise _invalid(f"steps must be between 1 and {settings.ALKEMY_MAX_STEPS}.", "steps")
    if not 1 <= num_images <= settings.ALKEMY_MAX_NUM_IMAGES:
        raise _invalid(f"num_images must be between 1 and {settings.ALKEMY_MAX_NUM_IMAGES}.", "num_images")
    if guidance is not None and not 0 <= guidance <= 30:
        raise _invalid("guidance must be between 0 and 30.", "guidance")
    if method == "gemini":
        allowed_model(params)  # every call spends a Gemini key: allow-listed models only
    if seed is not None and not 0 <= seed <= MAX_SEED - (num_images - 1):
        raise _invalid(f"seed must be between 0 and {MAX_SEED - (num_images - 1)}.", "seed")
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise _invalid(
            f"The Idempotency-Key header is longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
            "Idempotency-Key",
            "invalid_idempotency_key",
        )
    embedder = resolve_embedder_name()
    lora, style_lora = (None, None)
    if method == "lora":
        lora, style_lora = _resolve_loras(character, params)
    if method in IDENTITY_METHODS:
        # PuLID and InstantID take the embeddings their weights were trained on (embedding_space_mismatch otherwise)
        needed = method_embedder(method=method, models_dir=settings.ALKEMY_MODELS_DIR, default=embedder)
        identity_check(character=character, method=method, embedder=needed)
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - num_images + 2)
    if dry_run:
        from usage.services import usage_quote

        draft = GenerationJob(tenant=tenant, character=character, method=method, width=width, height=height,
                              steps=steps, num_images=num_images, params=params)  # fmt: skip
        return usage_quote(job=draft), False

    if idempotency_key:
        existing = idempotent_match(GenerationJob, tenant=tenant, key=idempotency_key, fingerprint=fingerprint)
        if existing:
            return existing, False
    try:
        with transaction.atomic():
            job = GenerationJob.objects.unscoped().create(
                tenant=tenant,
                character=character,
                embedder=embedder,
                method=method,
                prompt=prompt,
                negative_prompt=negative_prompt,
                width=width,
                height=height,
                steps=steps,
                guidance=guidance,
                seed=seed,
                num_images=num_images,
                params=params,
                total_steps=steps * num_images,
                idempotency_key=idempotency_key or None,
                request_hash=fingerprint,
                requested_by=requested_by if getattr(requested_by, "pk", None) else None,
                requested_by_api_key=requested_by_api_key,
                lora=lora,
                style_lora=style_lora,
            )
            usage_admit(job=job)  # budget and job limits, under the tenant's lock; raises 402 / 429
            notify(job, JobStatus.QUEUED)
            transaction.on_commit(lambda: enqueue(job.pk))
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race.
        existing = idempotent_match(GenerationJob, tenant=tenant, key=idempotency_key, fingerprint=fingerprint)
        if existing is None:
            raise
        return existing, False
    return job, True


def _checked_params(params) -> dict:
    """Method parameters: a JSON object of plain values that jsonb can hold, without the keys the worker fills in.

    Plain values are strings without NUL or lone surrogates, finite numbers, 64-bit integers, booleans and
    null, in lists and objects at most `MAX_PARAMS_DEPTH` deep and `MAX_PARAMS_BYTES` as JSON.
    """
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise _invalid("params must be a JSON object.", "params")
    reserved = sorted(RESERVED_PARAMS & set(params))
    if reserved:
        raise _invalid(f"params may not set {', '.join(reserved)}; they come from the character's LoRA.", "params")

    stack = [(params, 1)]  # iterative: hostile nesting cannot exhaust the stack
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise _invalid("params may not contain NUL characters.", "params")
            if _SURROGATE.search(value):
                raise _invalid("params may not contain lone UTF-16 surrogates (\\ud800-\\udfff).", "params")
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if not -(2**63) <= value < 2**63:
                raise _invalid("params numbers are too large (integers must fit in 64 bits).", "params")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _invalid("params numbers must be finite (no NaN or infinity).", "params")
        elif isinstance(value, (dict, list)):
            if depth > MAX_PARAMS_DEPTH:
                raise _invalid(f"params may be nested at most {MAX_PARAMS_DEPTH} levels deep.", "params")
            if isinstance(value, dict):
                if not all(isinstance(key, str) for key in value):
                    raise _invalid("params keys must be strings.", "params")
                stack.extend((key, depth) for key in value)
                stack.extend((item, depth + 1) for item in value.values())
            else:
                stack.extend((item, depth + 1) for item in value)
        else:
            raise _invalid(f"params may hold only JSON values, not {type(value).__name__}.", "params")
    if len(json.dumps(params).encode()) > MAX_PARAMS_BYTES:
        raise _invalid(f"params may be at most {MAX_PARAMS_BYTES // 1024} KiB as JSON.", "params")
    for name in ("lora_version", "style_lora"):
        if name in params and (isinstance(params[name], bool) or not isinstance(params[name], int)):
            raise _invalid(f"params.{name} must be an integer.", f"params.{name}")
    return dict(params)


def _resolve_loras(character: Character, params: dict):
    """The character's LoRA (selected, or `params["lora_version"]`) and an optional style LoRA."""
    from training.models import LoraArtifact, StyleLora

    loras = LoraArtifact.objects.unscoped().filter(tenant_id=character.tenant_id, character=character)
    version = params.get("lora_version")
    lora = loras.filter(version=version).first() if version is not None else loras.filter(is_selected=True).first()
    if lora is None:
        raise AlkemyError(
            f"Character '{character.name}' has no LoRA" + (f" version {version}." if version is not None else " yet."),
            code="no_lora",
            field="params.lora_version" if version is not None else "character",
            status_code=422,
        )
    style_lora = None
    if params.get("style_lora") is not None:
        style_lora = StyleLora.objects.unscoped().filter(tenant_id=character.tenant_id, pk=params["style_lora"]).first()
        if style_lora is None:
            raise AlkemyError(
                "No such style LoRA.", code="style_lora_not_found", field="params.style_lora", status_code=422
            )
        if style_lora.base_model != lora.base_model:
            raise AlkemyError(
                f"The style LoRA is for {style_lora.base_model}, the character's LoRA for {lora.base_model}.",
                code="base_model_mismatch",
                field="params.style_lora",
                status_code=422,
            )
    return lora, style_lora


def enqueue(job_id: int) -> None:
    """Hand the job to the GPU cluster. Safe to call more than once: the claim is conditional."""
    from django_q.tasks import async_task

    method = GenerationJob.objects.unscoped().filter(pk=job_id).values_list("method", flat=True).first()
    cluster = METHOD_CLUSTERS.get(method, GPU_CLUSTER)
    async_task("generation.tasks.run_generation_job", job_id, cluster=cluster, task_name=f"generation-{job_id}")


def generation_cancel(*, job: GenerationJob) -> GenerationJob:
    """Cancel a queued job now, or ask a running one to stop. `generation.canceled` is emitted once,
    by whoever makes the transition: this call for a queued job, the worker or reaper otherwise."""
    with transaction.atomic():
        _, canceled_now = job_request_cancel(GenerationJob, job.pk)
        if canceled_now:
            notify(job, JobStatus.CANCELED)
    job.refresh_from_db()
    return job


def job_payload(job: GenerationJob) -> dict:
    """The job as webhooks send it (the API serializer renders the same fields)."""
    return {
        "id": job.pk,
        "object": "generation",
        "status": job.status,
        "character": job.character_id,
        "method": job.method,
        "progress": round(job.progress, 4),
        "attempt": job.attempt,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "outputs": [
            {"id": o.pk, "seed": o.seed, "width": o.width, "height": o.height,
             "identity_similarity": o.identity_similarity, "identity_reason": o.identity_reason or None}
            for o in job.outputs.model.objects.unscoped().filter(job=job)
        ],
        "queued_at": job.queued_at.isoformat() if job.queued_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }  # fmt: skip


def notify(job: GenerationJob, status: str) -> None:
    """Emit the webhook event of a state change (deliveries are sent after commit)."""
    from alkemy.webhooks.services import emit

    try:
        job.refresh_from_db()
    except GenerationJob.DoesNotExist:  # deleted meanwhile (with its character): nobody left to tell
        logger.info("job %s was deleted; no generation.%s webhook", job.pk, status)
        return
    emit(tenant_id=job.tenant_id, event=f"generation.{status}", payload=job_payload(job))


def generation_job_delete(*, job: GenerationJob) -> None:
    """Delete a finished job with its outputs (files after commit); refused while it is queued or running."""
    from alkemy.files import delete_files_on_commit

    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        raise Conflict("The job is still queued or running; cancel it first.", code="job_not_finished")
    with transaction.atomic():
        names = list(GeneratedImage.objects.unscoped().filter(job=job).values_list("file", flat=True))
        job.delete()
        delete_files_on_commit(names)
