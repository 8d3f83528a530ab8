"""Reads of shot lists. Every function takes the tenant (or a list already resolved for it)."""

from __future__ import annotations

from collections import Counter

from django.db.models import QuerySet

from alkemy.errors import NotFound
from alkemy.jobs import JobStatus
from alkemy.tenancy.models import Tenant
from generation.models import GenerationJob
from shotlists.models import ShotJob, ShotList


def shotlist_list(*, tenant: Tenant) -> QuerySet[ShotList]:
    return ShotList.objects.unscoped().filter(tenant=tenant)


def shotlist_get(*, tenant: Tenant, shot_list_id) -> ShotList:
    try:
        return shotlist_list(tenant=tenant).get(pk=int(shot_list_id))
    except (ShotList.DoesNotExist, ValueError, TypeError):
        raise NotFound("No such shot list.", code="shot_list_not_found") from None


def shotlist_jobs(*, shot_list: ShotList) -> QuerySet[ShotJob]:
    """The list's links to its jobs, with the job, shot and character loaded."""
    return (
        ShotJob.objects.unscoped()
        .filter(tenant_id=shot_list.tenant_id, shot_list=shot_list)
        .select_related("job", "shot", "character")
        .order_by("shot__index", "id")
    )


def aggregate_status(statuses: list[str]) -> str:
    """One status for a list of jobs: `queued` (none started), `running` (some still to finish),
    `succeeded` (all), `partial` (all finished, some failed or canceled), `failed`, `canceled`."""
    counts = Counter(statuses)
    active = counts[JobStatus.QUEUED] + counts[JobStatus.RUNNING]
    if active:
        return JobStatus.QUEUED if counts[JobStatus.QUEUED] == len(statuses) else JobStatus.RUNNING
    if counts[JobStatus.SUCCEEDED] == len(statuses):
        return JobStatus.SUCCEEDED
    if counts[JobStatus.SUCCEEDED]:
        return "partial"
    return JobStatus.FAILED if counts[JobStatus.FAILED] else JobStatus.CANCELED


def shotlist_progress(*, shot_list: ShotList) -> dict:
    """Status, progress (mean of the jobs' progress; a finished job counts as done) and counts per status."""
    rows = list(
        GenerationJob.objects.unscoped()
        .filter(tenant_id=shot_list.tenant_id, shot_job__shot_list=shot_list)
        .values_list("status", "progress")
    )
    statuses = [status for status, _ in rows]
    done = [1.0 if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED) else progress
            for status, progress in rows]  # fmt: skip
    counts = Counter(statuses)
    return {
        "status": aggregate_status(statuses) if rows else JobStatus.QUEUED,
        "progress": round(sum(done) / len(done), 4) if done else 0.0,
        "jobs_total": len(rows),
        "jobs_by_status": {status.value: counts[status.value] for status in JobStatus},
    }
