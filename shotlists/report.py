"""The consistency report of a shot list: one row per character × method.

Per row, over the outputs of the row's succeeded jobs (re-rolls included):

- `identity`: the outputs' cosine similarity to the character's identity — mean, min, p10 (numpy's
  linear percentile), over the outputs where a face was found;
- `consistency`: cross-shot consistency, the cosine similarity of every pair of outputs of *different*
  shots (faces only) — mean, min and the number of pairs; what a video sequence needs is that shot 3
  looks like shot 1, whatever the references;
- `same_person_share`: the share of scoreable outputs (a face found, or none found) at or above the
  embedder's same-person threshold (`EmbedderInfo.match_threshold`); an output without a face counts
  as below, since the character is not recognisable in it;
- `outliers`: the outputs below the threshold or without a face, with their shot;
- `seconds_per_image` p50/p90 (each succeeded job's device seconds ÷ its images; wall time where a
  method reports no device time), `device_seconds` (sum over the row's jobs that report it);
- `cost` and `cost_per_image` (USD strings): the billable ledger events of the row's jobs, divided by the
  row's outputs; null when the usage app is not installed;
- `errors`: every failed or canceled job with its shot, code and message — a method that failed for a
  shot shows the error, not a hole; `shots` lists every job of every shot with its outputs.

For `lora` rows, `training` adds the LoRA version(s) used, the training jobs that produced them, their
device seconds and cost, and both amortised over the row's outputs.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from decimal import Decimal
from itertools import combinations

import numpy as np
from django.apps import apps

from alkemy.jobs import JobStatus
from characters.faces import embedder_infos
from characters.models import Character
from shotlists.measure import measure_shot_list
from shotlists.models import Shot, ShotList, ShotOutput
from shotlists.selectors import aggregate_status, shotlist_jobs, shotlist_progress

DIGITS = 4


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), DIGITS)


def _usd(value: Decimal | None) -> str | None:
    return None if value is None else f"{value.quantize(Decimal('0.000001'))}"


def _threshold(embedder: str) -> float | None:
    info = embedder_infos().get(embedder)
    return info.match_threshold if info else None


def _is_outlier(measured: ShotOutput, threshold: float | None) -> bool:
    if measured.reason == "no_face":
        return True
    if measured.identity_similarity is None or threshold is None:
        return False
    return measured.identity_similarity < threshold


def _billed(shot_list: ShotList, job_kind: str, job_ids) -> dict[int, Decimal] | None:
    """Billable cost per job from the usage ledger; None without the usage app."""
    if not apps.is_installed("usage"):
        return None
    from django.db.models import Sum

    from usage.models import UsageEvent

    rows = (
        UsageEvent.objects.unscoped()
        .filter(tenant_id=shot_list.tenant_id, job_kind=job_kind, job_id__in=list(job_ids), billable=True)
        .values("job_id")
        .annotate(total=Sum("cost"))
    )
    return {row["job_id"]: row["total"] for row in rows}


def _training(shot_list: ShotList, lora_ids: set[int], outputs: int) -> dict | None:
    """The training behind the LoRA versions a row used, amortised over the row's outputs."""
    if not lora_ids or not apps.is_installed("training"):
        return None
    from training.models import LoraArtifact, TrainingJob

    loras = LoraArtifact.objects.unscoped().filter(tenant_id=shot_list.tenant_id, pk__in=lora_ids)
    trainings = list(TrainingJob.objects.unscoped().filter(tenant_id=shot_list.tenant_id, lora_id__in=lora_ids))
    seconds = sum(t.device_seconds or 0.0 for t in trainings)
    billed = _billed(shot_list, "training", [t.pk for t in trainings])
    cost = None if billed is None else sum(billed.values(), Decimal(0))
    return {
        "loras": [{"id": lora.pk, "version": lora.version, "source": lora.source} for lora in loras],
        "training_jobs": [t.pk for t in trainings],
        "device_seconds": _r(seconds),
        "cost": _usd(cost),
        "amortised_seconds_per_image": _r(seconds / outputs) if outputs else None,
        "amortised_cost_per_image": _usd(cost / outputs) if cost is not None and outputs else None,
    }


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "min": None, "p10": None}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": _r(array.mean()), "min": _r(array.min()), "p10": _r(np.percentile(array, 10))}


def shotlist_report(*, shot_list: ShotList) -> dict:
    """The report as the API answers it (see the module docstring); measures unmeasured outputs first."""
    measure_shot_list(shot_list=shot_list)
    links = list(shotlist_jobs(shot_list=shot_list))
    measured = {
        m.output_id: m
        for m in ShotOutput.objects.unscoped().filter(shot_job__shot_list=shot_list).select_related("output")
    }
    outputs_by_job: dict[int, list[ShotOutput]] = defaultdict(list)
    for m in sorted(measured.values(), key=lambda m: (m.output.job_id, m.output.index)):
        outputs_by_job[m.output.job_id].append(m)
    billed = _billed(shot_list, "generation", [link.job_id for link in links])
    characters = {c.pk: c for c in Character.objects.unscoped().filter(pk__in=shot_list.character_ids)}
    shots = list(Shot.objects.unscoped().filter(shot_list=shot_list).order_by("index"))

    by_row = defaultdict(list)
    for link in links:
        by_row[(link.character_id, link.method)].append(link)
    rows = []
    embedders = set()
    for character_id in shot_list.character_ids:
        for method in shot_list.methods:
            row_links = by_row.get((character_id, method), [])
            rows.append(_row(characters.get(character_id), method, row_links, outputs_by_job, billed, shots,
                             shot_list, embedders))  # fmt: skip
    embedder = next(iter(embedders)) if len(embedders) == 1 else None
    return {
        "shot_list": shot_list.pk,
        "name": shot_list.name,
        **shotlist_progress(shot_list=shot_list),
        "embedder": embedder,
        "same_person_threshold": _threshold(embedder) if embedder else None,
        "shots": [
            {"index": s.index, "prompt": s.prompt, "seed": s.seed, "width": s.width, "height": s.height} for s in shots
        ],  # fmt: skip
        "rows": rows,
    }


def _row(character, method, links, outputs_by_job, billed, shots, shot_list, embedders) -> dict:
    jobs = [link.job for link in links]
    embedder = jobs[0].embedder if jobs else None
    if embedder:
        embedders.add(embedder)
    threshold = _threshold(embedder) if embedder else None
    shot_of_job = {link.job_id: link.shot.index for link in links}
    outputs = [m for job in jobs for m in outputs_by_job.get(job.pk, [])]
    faces = [m for m in outputs if m.embedding is not None]
    similarities = [m.identity_similarity for m in outputs if m.identity_similarity is not None]
    scoreable = [m for m in outputs if m.identity_similarity is not None or m.reason == "no_face"]
    above = [m for m in scoreable if m.identity_similarity is not None and threshold is not None
             and m.identity_similarity >= threshold]  # fmt: skip
    pairs = [
        float(np.dot(a.embedding, b.embedding))
        for a, b in combinations(faces, 2)
        if shot_of_job[a.output.job_id] != shot_of_job[b.output.job_id]
    ]
    per_image = []
    for job in jobs:
        count = len(outputs_by_job.get(job.pk, []))
        seconds = job.device_seconds if job.device_seconds is not None else job.run_seconds
        if job.status == JobStatus.SUCCEEDED and count and seconds is not None:
            per_image.append(seconds / count)
    device_seconds = [job.device_seconds for job in jobs if job.device_seconds is not None]
    cost = None if billed is None else sum((billed.get(job.pk, Decimal(0)) for job in jobs), Decimal(0))
    outliers = [
        {"output": m.output_id, "job": m.output.job_id, "shot": shot_of_job[m.output.job_id], "seed": m.output.seed,
         "identity_similarity": m.identity_similarity, "reason": m.reason or "below_threshold"}
        for m in outputs if _is_outlier(m, threshold)
    ]  # fmt: skip
    errors = [
        {"shot": shot_of_job[job.pk], "job": job.pk, "status": job.status, "code": job.error_code or job.status,
         "message": job.error_message}
        for job in jobs if job.status in (JobStatus.FAILED, JobStatus.CANCELED)
    ]  # fmt: skip
    outlier_ids = {o["output"] for o in outliers}
    row_shots = []
    for shot in shots:
        shot_links = [link for link in links if link.shot_id == shot.pk]
        row_shots.append({
            "shot": shot.index,
            "status": aggregate_status([link.job.status for link in shot_links]) if shot_links else None,
            "jobs": [_job_cell(link, outputs_by_job.get(link.job_id, []), outlier_ids) for link in shot_links],
        })  # fmt: skip
    row = {
        "character": {"id": character.pk, "name": character.name} if character else None,
        "method": method,
        "embedder": embedder,
        "jobs": len(jobs),
        "jobs_by_status": {status.value: sum(job.status == status for job in jobs) for status in JobStatus},
        "outputs": len(outputs),
        "faces": len(faces),
        "identity": _stats(similarities),
        "consistency": {
            "mean": _r(np.mean(pairs)) if pairs else None,
            "min": _r(min(pairs)) if pairs else None,
            "pairs": len(pairs),
        },
        "same_person_share": _r(len(above) / len(scoreable)) if scoreable and threshold is not None else None,
        "outliers": outliers,
        "seconds_per_image": {
            "p50": _r(np.percentile(per_image, 50)) if per_image else None,
            "p90": _r(np.percentile(per_image, 90)) if per_image else None,
        },
        "device_seconds": _r(sum(device_seconds)) if device_seconds else None,
        "cost": _usd(cost),
        "cost_per_image": _usd(cost / len(outputs)) if cost is not None and outputs else None,
        "errors": errors,
        "shots": row_shots,
    }
    if method == "lora":
        row["training"] = _training(shot_list, {job.lora_id for job in jobs if job.lora_id}, len(outputs))
    return row


def _job_cell(link, measured: list[ShotOutput], outlier_ids: set[int]) -> dict:
    job = link.job
    return {
        "job": job.pk,
        "status": job.status,
        "seed": job.seed,
        "reroll_of": link.reroll_of_id,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
        "outputs": [
            {
                "id": m.output_id,
                "seed": m.output.seed,
                "identity_similarity": m.identity_similarity,
                "reason": m.reason or None,
                "outlier": m.output_id in outlier_ids,
            }
            for m in measured
        ],  # fmt: skip
    }


def outliers_of(*, shot_list: ShotList) -> list[int]:
    """The output ids the report lists as outliers."""
    report = shotlist_report(shot_list=shot_list)
    return [outlier["output"] for row in report["rows"] for outlier in row["outliers"]]


CSV_COLUMNS = [
    "character_id", "character", "method", "jobs", "succeeded", "failed", "canceled", "outputs", "faces",
    "identity_mean", "identity_min", "identity_p10", "consistency_mean", "consistency_min", "consistency_pairs",
    "same_person_share", "outliers", "outlier_shots", "seconds_per_image_p50", "seconds_per_image_p90",
    "device_seconds", "cost", "cost_per_image", "errors",
]  # fmt: skip


def report_csv_rows(report: dict) -> list[dict]:
    """One flat row per character × method, the same numbers as the JSON (empty cell: null)."""
    flat = []
    for row in report["rows"]:
        by_status = row["jobs_by_status"]
        flat.append({
            "character_id": row["character"]["id"] if row["character"] else "",
            "character": row["character"]["name"] if row["character"] else "",
            "method": row["method"], "jobs": row["jobs"], "succeeded": by_status["succeeded"],
            "failed": by_status["failed"], "canceled": by_status["canceled"], "outputs": row["outputs"],
            "faces": row["faces"], "identity_mean": row["identity"]["mean"], "identity_min": row["identity"]["min"],
            "identity_p10": row["identity"]["p10"], "consistency_mean": row["consistency"]["mean"],
            "consistency_min": row["consistency"]["min"], "consistency_pairs": row["consistency"]["pairs"],
            "same_person_share": row["same_person_share"], "outliers": len(row["outliers"]),
            "outlier_shots": ";".join(str(o["shot"]) for o in row["outliers"]),
            "seconds_per_image_p50": row["seconds_per_image"]["p50"],
            "seconds_per_image_p90": row["seconds_per_image"]["p90"], "device_seconds": row["device_seconds"],
            "cost": row["cost"], "cost_per_image": row["cost_per_image"],
            "errors": "; ".join(f"shot {e['shot']}: {e['code']} {e['message']}".strip() for e in row["errors"]),
        })  # fmt: skip
    return flat


def report_csv(report: dict) -> str:
    """The report as CSV text (`outlier_shots` and `errors` name shots by index, as the JSON does)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in report_csv_rows(report):
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()
