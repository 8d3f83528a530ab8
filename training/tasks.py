"""django-q2 entry points for training jobs; the logic lives in worker.py and jobs.py."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from alkemy.jobs import JobStatus, job_requeue_or_fail, jobs_expired
from alkemy.logging import job_logging
from training.models import TrainingJob
from usage.services import usage_record_job

logger = logging.getLogger(__name__)


@job_logging("training")
def run_training_job(job_id: int) -> str:
    """GPU cluster: run one training job (a duplicate delivery returns 'skipped'; 'handed_back' when the
    cluster is stopping: the job goes back to the queue instead of starting, see generation.worker)."""
    from generation.worker import cluster_stopping
    from training.worker import run_training_job as run

    if cluster_stopping():
        from training.jobs import enqueue_training

        enqueue_training(job_id)
        return "handed_back"
    return run(job_id)


def reap_training_jobs() -> dict:
    """Default cluster, every minute (as the generation reaper): a training job whose worker stopped
    heartbeating goes back to the queue, where the next worker resumes it from its checkpoint, or fails
    `worker_lost` after ALKEMY_JOB_MAX_ATTEMPTS starts."""
    from training.jobs import enqueue_training, notify
    from training.worker import delete_checkpoint

    counts = {"requeued": 0, "failed": 0, "canceled": 0}
    for job in jobs_expired(TrainingJob):
        with transaction.atomic():  # a job the reaper ends is billed in the same transaction
            outcome = job_requeue_or_fail(TrainingJob, job, max_attempts=settings.ALKEMY_JOB_MAX_ATTEMPTS)
            if outcome in (JobStatus.FAILED, JobStatus.CANCELED):
                usage_record_job(job=job)
                delete_checkpoint(job.pk)
        if outcome == JobStatus.QUEUED:
            counts["requeued"] += 1
            logger.warning("training %s: worker %s lost, re-queued (attempt %s)", job.pk, job.worker, job.attempt)
            notify(job, JobStatus.QUEUED)
            enqueue_training(job.pk)
        elif outcome in (JobStatus.FAILED, JobStatus.CANCELED):
            counts[outcome] += 1
            notify(job, outcome)
    return counts
