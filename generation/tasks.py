"""django-q2 entry points. Task bodies stay here thin; the logic lives in worker.py and jobs.py."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from alkemy.jobs import JobStatus, job_requeue_or_fail, jobs_expired
from alkemy.logging import job_logging
from generation.models import GenerationJob
from usage.services import usage_record_job

logger = logging.getLogger(__name__)


@job_logging("generation")
def run_generation_job(job_id: int) -> str:
    """GPU cluster: run one job (a duplicate delivery returns 'skipped')."""
    from generation.worker import run_job

    return run_job(job_id)


def reap_jobs() -> dict:
    """Default cluster, every minute: re-queue jobs whose worker stopped heartbeating, or fail them."""
    from generation.jobs import enqueue, notify

    counts = {"requeued": 0, "failed": 0, "canceled": 0}
    for job in jobs_expired(GenerationJob):
        with transaction.atomic():  # a job the reaper ends is billed by the same transaction (usage policy)
            outcome = job_requeue_or_fail(GenerationJob, job, max_attempts=settings.ALKEMY_JOB_MAX_ATTEMPTS)
            if outcome in (JobStatus.FAILED, JobStatus.CANCELED):
                usage_record_job(job=job)
        if outcome == JobStatus.QUEUED:
            counts["requeued"] += 1
            logger.warning("job %s: worker %s lost, re-queued (attempt %s)", job.pk, job.worker, job.attempt)
            notify(job, JobStatus.QUEUED)
            enqueue(job.pk)
        elif outcome in (JobStatus.FAILED, JobStatus.CANCELED):
            counts[outcome] += 1
            notify(job, outcome)
    return counts


def deliver_due_webhooks() -> int:
    """Webhooks cluster, every minute (the schedule is moved there by webhooks 0002): send due retries."""
    from alkemy.webhooks.services import deliver_due

    return deliver_due()
