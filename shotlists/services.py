"""Submitting, cancelling and re-rolling shot lists.

A shot list fans out into ordinary generation jobs, one per character × method × shot, each
through `generation.jobs.generation_submit`: the same validation, the same budget and job limits
(`usage_admit`), the same webhooks. The whole fan-out is one transaction: the first job that is
refused rolls every job of the list back, and since jobs are enqueued on commit, nothing reaches a
worker. The refusal carries the shot's index (and character and method) in `details`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.conf import settings
from django.db import IntegrityError, transaction

from alkemy.errors import AlkemyError
from alkemy.jobs import TERMINAL, idempotent_match, request_hash
from alkemy.tenancy.models import Tenant
from characters.models import Character
from generation.jobs import MAX_SEED, generation_cancel, generation_submit
from generation.methods import DEFAULT_METHOD, METHODS
from generation.models import GeneratedImage, GenerationJob
from shotlists.models import Shot, ShotJob, ShotList

#: fields of a shot that are passed to every job of it as they are
SHOT_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "params")
#: a generation refusal about one of these fields is about the shot (details.field becomes `shots[i].<name>`)
_SHOT_ERROR_FIELDS = frozenset(SHOT_FIELDS) | {"params.lora_version", "params.style_lora"}


@dataclass
class ShotSpec:
    """One shot as asked for; unset values take the generation defaults."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    params: dict = field(default_factory=dict)


def _invalid(message: str, *, field: str, code: str = "invalid_parameter", **details) -> AlkemyError:
    return AlkemyError(message, code=code, field=field, details=details)


def _check_list(*, characters: Sequence[Character], methods: Sequence[str], shots: Sequence[ShotSpec],
                images_per_shot: int, name: str) -> None:  # fmt: skip
    if not name or not name.strip():
        raise _invalid("A shot list needs a name.", field="name")
    if not characters:
        raise _invalid("Name at least one character.", field="characters", code="no_characters")
    if len({c.pk for c in characters}) != len(characters):
        raise _invalid("A character is named twice.", field="characters", code="duplicate_character")
    if not methods:
        raise _invalid("Name at least one method.", field="methods")
    for method in methods:
        if method not in METHODS:
            raise _invalid(
                f"Unknown method '{method}'; known: {', '.join(METHODS)}.", field="methods", code="unknown_method",
                method=method,
            )  # fmt: skip
    if len(set(methods)) != len(methods):
        raise _invalid("A method is named twice.", field="methods", code="duplicate_method")
    if not shots:
        raise _invalid("A shot list needs at least one shot.", field="shots", code="no_shots")
    cap = settings.ALKEMY_SHOTLIST_MAX_SHOTS
    if len(shots) > cap:
        raise _invalid(
            f"{len(shots)} shots; a shot list may have at most {cap} (ALKEMY_SHOTLIST_MAX_SHOTS).",
            field="shots", code="too_many_shots", limit=cap, count=len(shots),
        )  # fmt: skip
    jobs = len(characters) * len(methods) * len(shots)
    if jobs > settings.ALKEMY_SHOTLIST_MAX_JOBS:
        raise _invalid(
            f"{len(characters)} character(s) × {len(methods)} method(s) × {len(shots)} shot(s) = {jobs} jobs; "
            f"a shot list may fan out into at most {settings.ALKEMY_SHOTLIST_MAX_JOBS} (ALKEMY_SHOTLIST_MAX_JOBS).",
            field="shots", code="too_many_jobs_in_list", limit=settings.ALKEMY_SHOTLIST_MAX_JOBS, count=jobs,
        )  # fmt: skip
    if not 1 <= images_per_shot <= settings.ALKEMY_MAX_NUM_IMAGES:
        raise _invalid(f"images_per_shot must be between 1 and {settings.ALKEMY_MAX_NUM_IMAGES}.",
                       field="images_per_shot")  # fmt: skip
    for index, shot in enumerate(shots):
        if shot.seed is not None and not 0 <= shot.seed <= MAX_SEED - (images_per_shot - 1):
            raise _invalid(f"seed must be between 0 and {MAX_SEED - (images_per_shot - 1)}.",
                           field=f"shots[{index}].seed", shot=index)  # fmt: skip


def _about_the_shot(error: AlkemyError, *, index: int, character: Character, method: str) -> AlkemyError:
    """The generation refusal, saying which shot (and character and method) it was about."""
    if error.field in _SHOT_ERROR_FIELDS:
        error.details["field"] = f"shots[{index}].{error.field}"
    elif error.field == "num_images":
        error.details["field"] = "images_per_shot"
    error.details.update(shot=index, character=character.pk, method=method)
    error.message = f"Shot {index} ({character.name}, {method}): {error.message}"
    error.args = (error.message,)
    return error


def _job_params(shot: Shot, method: str, method_params: dict) -> dict:
    return {**(shot.params or {}), **(method_params.get(method) or {})}


def _submit_job(*, shot_list: ShotList, shot: Shot, character: Character, method: str, seed: int,
                num_images: int, reroll_of: GeneratedImage | None = None) -> ShotJob:  # fmt: skip
    try:
        job, _ = generation_submit(
            tenant=shot_list.tenant, character=character, method=method, prompt=shot.prompt,
            negative_prompt=shot.negative_prompt, width=shot.width, height=shot.height, steps=shot.steps,
            guidance=shot.guidance, seed=seed, num_images=num_images,
            params=_job_params(shot, method, shot_list.method_params),
            requested_by=shot_list.requested_by, requested_by_api_key=shot_list.requested_by_api_key,
        )  # fmt: skip
    except AlkemyError as error:
        raise _about_the_shot(error, index=shot.index, character=character, method=method) from None
    return ShotJob.objects.unscoped().create(
        tenant=shot_list.tenant, shot_list=shot_list, shot=shot, character=character, method=method, job=job,
        reroll_of=reroll_of,
    )  # fmt: skip


def _new_seed(num_images: int, other_than: int | None = None) -> int:
    while True:
        seed = secrets.randbelow(MAX_SEED - num_images + 2)
        if seed != other_than:
            return seed


def shotlist_submit(
    *,
    tenant: Tenant,
    name: str,
    characters: Sequence[Character],
    shots: Sequence[ShotSpec],
    methods: Sequence[str] | None = None,
    images_per_shot: int = 1,
    method_params: dict | None = None,
    idempotency_key: str | None = None,
    requested_by=None,
    requested_by_api_key=None,
) -> tuple[ShotList, bool]:
    """Store the shot list and submit one generation job per character × method × shot. Returns (list, created).

    `characters` must be the tenant's (the caller resolves ids with `character_get`, which answers 404).
    `methods` defaults to the default method. A shot without a seed gets a random one, shared by every
    character and method so they are compared on the same noise. Everything is refused before anything is
    queued: 400 for the list's shape (`no_shots`, `too_many_shots`, `unknown_method`, ...), and any refusal of
    one job (a bad shot, `no_identity`, `no_lora`, 402 `budget_exceeded`, 429 `too_many_jobs`) refuses the
    whole list, with `details.shot`, `details.character` and `details.method` saying which job it was.

    With an idempotency key a retry with the same body returns the first list (created=False); the same
    key with another body is 409 `idempotency_key_reused`.
    """
    methods = list(methods) if methods else [DEFAULT_METHOD]
    method_params = dict(method_params or {})
    _check_list(characters=characters, methods=methods, shots=shots, images_per_shot=images_per_shot, name=name)
    unknown = sorted(set(method_params) - set(methods))
    if unknown:
        raise _invalid(f"method_params names methods not in the list: {', '.join(unknown)}.", field="method_params")
    fingerprint = request_hash(
        {"name": name, "characters": [c.pk for c in characters], "methods": methods, "images_per_shot": images_per_shot,
         "method_params": method_params, "shots": [vars(s) for s in shots]}
    )  # fmt: skip
    if idempotency_key:
        existing = _earlier(tenant, idempotency_key, fingerprint)
        if existing is not None:
            return existing, False
    try:
        with transaction.atomic():
            shot_list = ShotList.objects.unscoped().create(
                tenant=tenant, name=name.strip(), character_ids=[c.pk for c in characters], methods=methods,
                images_per_shot=images_per_shot, method_params=method_params, idempotency_key=idempotency_key or None,
                request_hash=fingerprint, requested_by=requested_by if getattr(requested_by, "pk", None) else None,
                requested_by_api_key=requested_by_api_key,
            )  # fmt: skip
            stored = [
                Shot.objects.unscoped().create(
                    tenant=tenant,
                    shot_list=shot_list,
                    index=index,
                    prompt=spec.prompt,
                    negative_prompt=spec.negative_prompt,
                    width=spec.width,
                    height=spec.height,
                    steps=spec.steps,
                    guidance=spec.guidance,
                    seed=_new_seed(images_per_shot) if spec.seed is None else spec.seed,
                    params=dict(spec.params or {}),
                )  # fmt: skip
                for index, spec in enumerate(shots)
            ]
            # shot by shot, so the first refusal names the earliest shot
            for shot in stored:
                for character in characters:
                    for method in methods:
                        _submit_job(shot_list=shot_list, shot=shot, character=character, method=method,
                                    seed=shot.seed, num_images=images_per_shot)  # fmt: skip
    except IntegrityError:
        existing = _earlier(tenant, idempotency_key, fingerprint) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    return shot_list, True


def shotlist_quote(
    *,
    tenant: Tenant,
    characters: Sequence[Character],
    shots: Sequence[ShotSpec],
    methods: Sequence[str] | None = None,
    images_per_shot: int = 1,
    method_params: dict | None = None,
) -> dict:
    """What `shotlist_submit` would cost, creating nothing: every job validated and estimated like a
    `?dry_run=true` generation (`usage_quote`), added up per method and in total, with the verdicts of the
    tenant's budget and job limits on the whole list (`allowed`, `refusal`). Refuses what submission refuses."""
    from decimal import Decimal

    from usage.money import exact

    methods = list(methods) if methods else [DEFAULT_METHOD]
    method_params = dict(method_params or {})
    _check_list(characters=characters, methods=methods, shots=shots, images_per_shot=images_per_shot, name="quote")
    per_method = {m: {"jobs": 0, "images": 0, "device_seconds": Decimal(0), "cost": Decimal(0)} for m in methods}
    quote = refusal = None
    for index, spec in enumerate(shots):
        shot = Shot(index=index, **{name: getattr(spec, name) for name in SHOT_FIELDS})
        for character in characters:
            for method in methods:
                try:
                    quote, _ = generation_submit(
                        tenant=tenant, character=character, method=method, prompt=shot.prompt,
                        negative_prompt=shot.negative_prompt, width=shot.width, height=shot.height, steps=shot.steps,
                        guidance=shot.guidance, seed=shot.seed, num_images=images_per_shot,
                        params=_job_params(shot, method, method_params), dry_run=True,
                    )  # fmt: skip
                except AlkemyError as error:
                    raise _about_the_shot(error, index=index, character=character, method=method) from None
                line = per_method[method]
                line["jobs"] += 1
                line["images"] += images_per_shot
                line["device_seconds"] += quote.estimate.device_seconds
                line["cost"] += quote.estimate.cost
                if refusal is None and quote.refusal is not None:
                    refusal = _about_the_shot(quote.refusal, index=index, character=character, method=method)
    total = sum((line["cost"] for line in per_method.values()), Decimal(0))
    jobs = sum(line["jobs"] for line in per_method.values())
    budget, limits = quote.budget, quote.jobs
    hard_limit = budget["remaining"] is not None and budget["limit_kind"] != "soft"
    if refusal is None and hard_limit and total > Decimal(budget["remaining"]):
        refusal = AlkemyError(
            f"The shot list (estimated ${exact(total)}) would take the month's spend past the limit of "
            f"${budget['limit']}: ${budget['spent']} spent and ${budget['reserved']} reserved.",
            code="budget_exceeded", status_code=402, details={**budget, "estimate": exact(total)},
        )  # fmt: skip
    in_flight = limits["running"] + limits["queued"]
    for cap, used, what in ((limits["max_concurrent_jobs"], in_flight, "in flight"),
                            (limits["max_queued_jobs"], limits["queued"], "waiting to start")):  # fmt: skip
        if refusal is None and cap is not None and used + jobs > cap:
            refusal = AlkemyError(
                f"The shot list's {jobs} jobs would make {used + jobs} job(s) {what}; the limit is {cap}.",
                code="too_many_jobs", status_code=429, details={**limits, "jobs": jobs},
            )  # fmt: skip
    return {
        "jobs": jobs,
        "estimate": {"cost": exact(total), "currency": "USD",
                     "device_seconds": float(sum(line["device_seconds"] for line in per_method.values())),
                     "per_method": {m: {"jobs": line["jobs"], "images": line["images"],
                                        "device_seconds": float(line["device_seconds"]), "cost": exact(line["cost"]),
                                        "cost_per_image": exact(line["cost"] / line["images"])}
                                    for m, line in per_method.items()}},
        "budget": budget,
        "job_limits": limits,
        "allowed": refusal is None,
        "refusal": None if refusal is None else {"code": refusal.code, "message": refusal.message,
                                                 "details": refusal.details},
    }  # fmt: skip


def shotlist_cancel(*, shot_list: ShotList) -> int:
    """Cancel every job of the list that has not finished (queued at once, running at its next step).
    Returns how many jobs were asked to stop."""
    pending = (
        GenerationJob.objects.unscoped()
        .filter(tenant_id=shot_list.tenant_id, shot_job__shot_list=shot_list)
        .exclude(status__in=TERMINAL)
    )
    count = 0
    for job in pending:
        generation_cancel(job=job)
        count += 1
    return count


def shotlist_reroll(*, shot_list: ShotList, output_ids: Sequence[int] | None = None) -> list[ShotJob]:
    """Render the shots of the given outputs again with new seeds (one image per output), or of every outlier
    of the report when no outputs are named. The new jobs join the list and its report.

    An output id that is not one of this list's is 404 `output_not_found`; nothing to re-roll is 400
    `nothing_to_reroll`. The new jobs are admitted like any (402/429 refuse them all)."""
    from shotlists.report import outliers_of

    outputs = GeneratedImage.objects.unscoped().filter(tenant_id=shot_list.tenant_id,
                                                       job__shot_job__shot_list=shot_list)  # fmt: skip
    if output_ids:
        wanted = list(dict.fromkeys(output_ids))
        chosen = list(outputs.filter(pk__in=wanted).select_related("job__shot_job__shot", "job__shot_job__character"))
        missing = sorted(set(wanted) - {o.pk for o in chosen})
        if missing:
            raise AlkemyError(
                f"Output(s) {', '.join(map(str, missing))} are not outputs of this shot list.",
                code="output_not_found", field="outputs", details={"outputs": missing}, status_code=404,
            )  # fmt: skip
    else:
        chosen = list(
            outputs.filter(pk__in=outliers_of(shot_list=shot_list))
            .select_related("job__shot_job__shot", "job__shot_job__character")
        )  # fmt: skip
    if not chosen:
        raise _invalid("There is nothing to re-roll: no outputs named and no outliers.", field="outputs",
                       code="nothing_to_reroll")  # fmt: skip
    created = []
    with transaction.atomic():
        for output in sorted(chosen, key=lambda o: o.pk):
            link = output.job.shot_job
            created.append(
                _submit_job(
                    shot_list=shot_list,
                    shot=link.shot,
                    character=link.character,
                    method=link.method,
                    seed=_new_seed(1, other_than=output.seed),
                    num_images=1,
                    reroll_of=output,
                )  # fmt: skip
            )
    return created


def _earlier(tenant: Tenant, key: str, fingerprint: str) -> ShotList | None:
    return idempotent_match(ShotList, tenant=tenant, key=key, fingerprint=fingerprint, detail="shot_list")
