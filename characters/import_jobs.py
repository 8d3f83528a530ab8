"""Bulk imports as jobs: `POST /api/v1/characters/import` stores the zip and queues a `CharacterImport` on the
CPU (default) cluster; a worker runs `characters.imports.import_run` on it with the lifecycle of `alkemy.jobs`.

The archive is checked when it is submitted (not a zip, too many files, too large unpacked, unsafe paths:
400 with a code, no job), so a queued job only meets problems of single files, which its report lists.
The run writes progress with the lease heartbeat at most once a second and stops at a cancellation. A job
delivered again, or re-queued after its worker died, runs the import again: photos already enrolled are
skipped, so it resumes rather than duplicates. The archive is deleted when the job ends; the report stays.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction

from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus, idempotent_match, job_claim, job_finish, job_heartbeat, request_hash, worker_id
from alkemy.logging import job_logging
from alkemy.tenancy.models import Tenant
from alkemy.tenancy.scoping import tenant_scope
from characters.faces import resolve_embedder_name
from characters.imports import entries_from_archive, import_limit, import_run, open_archive
from characters.models import CharacterImport, import_upload_to

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 1.0


def import_submit(
    *,
    tenant: Tenant,
    upload,
    dry_run: bool = False,
    requested_by=None,
    requested_by_api_key=None,
    idempotency_key: str | None = None,
) -> tuple[CharacterImport, bool]:
    """Check the archive and queue its import. Returns (job, created); an Idempotency-Key retry with the
    same archive returns the first job. AlkemyError (4xx) for an archive that cannot be imported."""
    if upload is None:
        raise AlkemyError("Send the zip archive as multipart field 'archive'.", code="archive_required",
                          field="archive")  # fmt: skip
    limit = import_limit("ALKEMY_IMPORT_MAX_ARCHIVE_BYTES")
    if (upload.size or 0) > limit:
        raise AlkemyError(
            f"The archive is {upload.size} bytes; the limit is {limit}.",
            code="archive_too_large",
            field="archive",
            details={"size": upload.size, "max_bytes": limit},
            status_code=413,
        )
    digest = hashlib.sha256()
    upload.seek(0)
    for chunk in upload.chunks():
        digest.update(chunk)
    sha256 = digest.hexdigest()
    fingerprint = request_hash({"archive_sha256": sha256, "dry_run": dry_run})
    if idempotency_key:
        existing = idempotent_match(CharacterImport, tenant=tenant, key=idempotency_key, fingerprint=fingerprint,
                                    detail="import")  # fmt: skip
        if existing is not None:
            return existing, False

    upload.seek(0)
    archive = open_archive(upload)  # 400 invalid_archive / archive_too_large / unsafe_archive
    entries = entries_from_archive(archive)
    if not entries:
        raise AlkemyError("The archive holds no character folder with photos.", code="empty_archive",
                          field="archive")  # fmt: skip

    job = CharacterImport(
        tenant=tenant,
        archive_name=(getattr(upload, "name", "") or "")[:255],
        archive_sha256=sha256,
        archive_size=upload.size or 0,
        dry_run=dry_run,
        embedder=resolve_embedder_name(),
        total_files=len(entries),
        requested_by=requested_by if getattr(requested_by, "pk", None) else None,
        requested_by_api_key=requested_by_api_key,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
    )
    upload.seek(0)
    stored = default_storage.save(import_upload_to(job, ""), File(upload))
    job.archive.name = stored
    try:
        with transaction.atomic():
            job.save()
            transaction.on_commit(lambda: enqueue_import(job.pk))
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the race
        default_storage.delete(stored)
        existing = idempotent_match(CharacterImport, tenant=tenant, key=idempotency_key, fingerprint=fingerprint,
                                    detail="import") if idempotency_key else None  # fmt: skip
        if existing is None:
            raise
        return existing, False
    except BaseException:
        default_storage.delete(stored)
        raise
    return job, True


def enqueue_import(job_id: int) -> None:
    """Hand the import to the default (CPU) cluster. Safe to call more than once: the claim is conditional."""
    from django_q.tasks import async_task

    async_task("characters.import_jobs.run_import_job", job_id, task_name=f"character-import-{job_id}")


def import_cancel(*, job: CharacterImport) -> CharacterImport:
    from alkemy.jobs import job_request_cancel

    status, canceled_now = job_request_cancel(CharacterImport, job.pk)
    if canceled_now:
        _drop_archive(job.pk)
    job.refresh_from_db()
    return job


def _drop_archive(job_id: int) -> None:
    name = CharacterImport.objects.unscoped().filter(pk=job_id).values_list("archive", flat=True).first()
    if name:
        transaction.on_commit(lambda: default_storage.delete(name))
        CharacterImport.objects.unscoped().filter(pk=job_id).update(archive="")


@job_logging("import")
def run_import_job(job_id: int) -> str:
    """CPU cluster: claim and run one import. Returns the final status, or 'skipped' when it was not ours."""
    me = worker_id()
    if not job_claim(CharacterImport, job_id, worker=me):
        logger.info("character import %s not claimed (already taken, finished or canceled)", job_id)
        return "skipped"
    job = CharacterImport.objects.unscoped().select_related("tenant").get(pk=job_id)
    state = {"last": 0.0, "stop": None}

    def progress(done: int, total: int) -> bool:
        now = time.monotonic()
        if now - state["last"] < PROGRESS_INTERVAL_SECONDS and done < total:
            return False
        state["last"] = now
        mine, cancel = job_heartbeat(CharacterImport, job_id, worker=me, progress=min(done / max(total, 1), 1.0),
                                     step=done, total=total)  # fmt: skip
        state["stop"] = "lost" if not mine else ("canceled" if cancel else None)
        return state["stop"] is not None

    started = time.monotonic()
    try:
        with tenant_scope(job.tenant_id), tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024) as copy:
            with default_storage.open(job.archive.name, "rb") as stored:
                for chunk in iter(lambda: stored.read(1024 * 1024), b""):
                    copy.write(chunk)
            copy.seek(0)
            entries = entries_from_archive(open_archive(copy))
            result = import_run(
                tenant=job.tenant,
                entries=entries,
                dry_run=job.dry_run,
                created_by=job.requested_by,
                created_by_api_key=job.requested_by_api_key,
                workers=1,  # in this queue worker: it may not fork (daemonic); the cluster's others serve other jobs
                progress=progress,
            )
    except Exception as exc:  # noqa: BLE001 - a job ends failed with the reason, never silently
        logger.exception("character import %s failed", job_id)
        code = getattr(exc, "code", "import_failed") if isinstance(exc, AlkemyError) else "import_failed"
        job_finish(CharacterImport, job_id, worker=me, status=JobStatus.FAILED, error_code=code,
                   error_message=str(exc))  # fmt: skip
        _drop_archive(job_id)
        return JobStatus.FAILED
    if state["stop"] == "lost":
        return "lost"
    status = JobStatus.CANCELED if state["stop"] == "canceled" else JobStatus.SUCCEEDED
    extra = {"error_code": "canceled", "error_message": "Canceled while it ran; the report lists what was done."}
    with transaction.atomic():
        finished = job_finish(
            CharacterImport,
            job_id,
            worker=me,
            status=status,
            report=result.report,
            timings={"run": round(time.monotonic() - started, 3)},
            **result.counts(),
            **(extra if status == JobStatus.CANCELED else {}),
        )
        if finished:
            _drop_archive(job_id)
    return status if finished else "lost"


def reap_import_jobs() -> dict:
    """Default cluster, every minute (migration 0008): an import whose worker stopped heartbeating goes back
    to the queue, where the next run skips what it already enrolled, or fails `worker_lost` after
    ALKEMY_JOB_MAX_ATTEMPTS starts."""
    from alkemy.jobs import job_requeue_or_fail, jobs_expired

    counts = {"requeued": 0, "failed": 0, "canceled": 0}
    for job in jobs_expired(CharacterImport):
        outcome = job_requeue_or_fail(CharacterImport, job, max_attempts=settings.ALKEMY_JOB_MAX_ATTEMPTS)
        if outcome == JobStatus.QUEUED:
            counts["requeued"] += 1
            logger.warning("character import %s: worker %s lost, re-queued (attempt %s)", job.pk, job.worker,
                           job.attempt)  # fmt: skip
            enqueue_import(job.pk)
        elif outcome in (JobStatus.FAILED, JobStatus.CANCELED):
            counts[outcome] += 1
            _drop_archive(job.pk)
    return counts
