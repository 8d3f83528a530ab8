"""The lifecycle every long-running job shares (generation now, LoRA training later).

The job row is the source of truth; the queue is only transport and may deliver a task twice.
Every state change is a conditional UPDATE on the current status (and, for a running job, on
the worker holding it), so a duplicate delivery, a late worker or a reaper race changes nothing:

    queued ──claim──▶ running ──finish──▶ succeeded
       │                 │ ├──fail────▶ failed
       │                 │ └──cancel──▶ canceled
       │                 └──lease expired (reaper)──▶ queued (attempt < max) / failed worker_lost
       └──cancel──▶ canceled
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from alkemy.tenancy.scoping import TenantOwnedModel


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELED = "canceled", "Canceled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(current: str, target: str) -> None:
    if target not in ALLOWED_TRANSITIONS[current]:
        raise IllegalTransition(f"a job cannot go from {current} to {target}")


def request_hash(fields: dict) -> str:
    """Fingerprint of what the client sent (before defaults): an idempotent retry sends the same body."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def idempotent_match(model, *, tenant, key: str, fingerprint: str, detail: str = "job"):
    """The tenant's row already submitted with this Idempotency-Key, or None; 409 `idempotency_key_reused`
    when it was submitted with another body (`details[detail]` names it). `model` has `idempotency_key`
    and `request_hash` columns (every job kind, shot lists)."""
    from alkemy.errors import Conflict

    row = model.objects.unscoped().filter(tenant=tenant, idempotency_key=key).first()
    if row is not None and row.request_hash != fingerprint:
        raise Conflict(
            "This Idempotency-Key was already used with a different request body.",
            code="idempotency_key_reused",
            details={detail: row.pk},
        )
    return row


def worker_id() -> str:
    """host:pid of this process, stored on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lease_duration() -> timedelta:
    return timedelta(seconds=settings.ALKEMY_JOB_LEASE_SECONDS)


class Job(TenantOwnedModel):
    """Abstract job: status, progress, lease, attempts, cancellation, error, timestamps."""

    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0, help_text="0–1")
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    attempt = models.PositiveSmallIntegerField(default=0, help_text="How many times a worker has started it")
    worker = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    error_details = models.JSONField(default=dict, blank=True)
    queued_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def queue_wait_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        return round((self.started_at - self.queued_at).total_seconds(), 3)

    @property
    def run_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or timezone.now()
        return round((end - self.started_at).total_seconds(), 3)


# --- transitions: each one conditional UPDATE, True when this caller made the change ------------


def job_claim(model: type[Job], job_id: int, *, worker: str) -> bool:
    """queued → running for `worker`; False when another delivery or worker got there first."""
    now = timezone.now()
    return (
        model.objects.unscoped()
        .filter(pk=job_id, status=JobStatus.QUEUED, cancel_requested=False)
        .update(
            status=JobStatus.RUNNING,
            worker=worker,
            attempt=models.F("attempt") + 1,
            started_at=now,
            heartbeat_at=now,
            lease_expires_at=now + lease_duration(),
            progress=0.0,
            current_step=0,
        )
        == 1
    )


def job_heartbeat(
    model: type[Job],
    job_id: int,
    *,
    worker: str,
    progress: float | None = None,
    step: int | None = None,
    total: int | None = None,
) -> tuple[bool, bool]:
    """Extend the lease (and record progress). Returns (still ours, cancel requested)."""
    now = timezone.now()
    changes = {"heartbeat_at": now, "lease_expires_at": now + lease_duration()}
    if progress is not None:
        changes.update(progress=progress, current_step=step or 0, total_steps=total or 0)
    mine = model.objects.unscoped().filter(pk=job_id, status=JobStatus.RUNNING, worker=worker)
    if mine.update(**changes) == 0:
        return False, False
    cancel = mine.values_list("cancel_requested", flat=True).first()
    return True, bool(cancel)


def job_finish(
    model: type[Job],
    job_id: int,
    *,
    worker: str,
    status: str,
    error_code: str = "",
    error_message: str = "",
    error_details: dict | None = None,
    **extra,
) -> bool:
    """running → succeeded / failed / canceled, only for the worker holding the job."""
    check_transition(JobStatus.RUNNING, status)
    changes = {"status": status, "finished_at": timezone.now(), "lease_expires_at": None, **extra}
    if status == JobStatus.SUCCEEDED:
        changes["progress"] = 1.0
    if error_code:
        changes.update(error_code=error_code, error_message=error_message[:5000], error_details=error_details or {})
    return model.objects.unscoped().filter(pk=job_id, status=JobStatus.RUNNING, worker=worker).update(**changes) == 1


def job_request_cancel(model: type[Job], job_id: int) -> tuple[str | None, bool]:
    """Cancel a queued job at once; ask a running one to stop at its next step.

    Returns (the status now, True when this call made queued → canceled). Only that call reports
    the cancellation: a repeated cancel, or one of a running job (its worker finishes it), does not.
    """
    now = timezone.now()
    rows = model.objects.unscoped().filter(pk=job_id)
    if rows.filter(status=JobStatus.QUEUED).update(
        status=JobStatus.CANCELED,
        cancel_requested=True,
        finished_at=now,
        error_code="canceled",
        error_message="Canceled before it started.",
    ):
        return JobStatus.CANCELED, True
    rows.filter(status=JobStatus.RUNNING).update(cancel_requested=True)
    return rows.values_list("status", flat=True).first(), False


def jobs_expired(model: type[Job]):
    return model.objects.unscoped().filter(status=JobStatus.RUNNING, lease_expires_at__lt=timezone.now())


def job_requeue_or_fail(model: type[Job], job: Job, *, max_attempts: int) -> str | None:
    """Reaper: a running job whose lease expired goes back to the queue, or fails `worker_lost`."""
    rows = model.objects.unscoped().filter(
        pk=job.pk, status=JobStatus.RUNNING, worker=job.worker, lease_expires_at__lt=timezone.now()
    )
    if job.cancel_requested:  # its worker died before it could stop it: nothing left to run
        changed = rows.update(
            status=JobStatus.CANCELED, finished_at=timezone.now(), lease_expires_at=None, error_code="canceled",
            error_message="Canceled; its worker stopped responding before it could stop.",
        )  # fmt: skip
        return JobStatus.CANCELED if changed else None
    if job.attempt < max_attempts:
        # Waiting again from now, not started: the next claim starts the clock of the new attempt.
        changed = rows.update(
            status=JobStatus.QUEUED,
            worker="",
            lease_expires_at=None,
            progress=0.0,
            current_step=0,
            queued_at=timezone.now(),
            started_at=None,
            heartbeat_at=None,
        )
        return JobStatus.QUEUED if changed else None
    changed = rows.update(
        status=JobStatus.FAILED,
        finished_at=timezone.now(),
        lease_expires_at=None,
        error_code="worker_lost",
        error_message=f"The worker stopped responding {job.attempt} time(s); giving up.",
    )
    return JobStatus.FAILED if changed else None
