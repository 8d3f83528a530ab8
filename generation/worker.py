"""The GPU worker runtime: what runs inside a `Q_CLUSTER_NAME=gpu` worker process for one job.

- Methods load lazily here, in the worker process, never in the qcluster parent that forks
  workers (CUDA does not survive a fork). Loaded methods stay warm between jobs in a cache
  bounded by a memory budget, least recently used evicted first.
- The job row is claimed with a conditional UPDATE, so a duplicate delivery does nothing.
- Each denoising step: cancellation is checked (a canceled job stops within one step and keeps
  no outputs), the per-method timeout is enforced, and at most once a second the progress is
  written together with the lease heartbeat.
- CUDA out-of-memory fails the job `gpu_out_of_memory`; the worker frees memory and keeps serving.
- Outputs are identity-scored and PNG-encoded in background threads while the next image
  denoises (`generate_for_character`), then stored and the job finished in one transaction,
  conditional on this worker still holding the job: if the reaper gave it to another worker
  meanwhile, ours are discarded, so a job never completes twice.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction

from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus, job_claim, job_finish, job_heartbeat, worker_id
from alkemy.tenancy.scoping import tenant_scope
from characters.models import Character
from generation.methods import IDENTITY_METHODS
from generation.methods.base import GenerationMethod, GenerationRequest, LoadOptions
from generation.models import GeneratedImage, GenerationJob
from usage.services import usage_record_job

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 1.0


class JobCanceled(Exception):
    pass


class JobLost(Exception):
    """The lease was taken away (the reaper re-queued the job): stop, keep nothing."""


class JobTimedOut(Exception):
    pass


#: the database connection broke (a restart, a failover): the next query opens a new one
CONNECTION_LOST = (OperationalError, InterfaceError)


# --- warm pipelines ------------------------------------------------------------------------------


def module_bytes(method: GenerationMethod) -> int:
    """Parameter + buffer bytes of every torch module a loaded method holds (pipelines included)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(module: torch.nn.Module) -> None:
        nonlocal total
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()

    def visit(value) -> None:
        if isinstance(value, torch.nn.Module):
            add(value)
        elif isinstance(value, dict):  # e.g. lazily loaded base pipelines by name
            for item in value.values():
                visit(item)
        components = getattr(value, "components", None)
        if isinstance(components, dict):
            for component in components.values():
                if isinstance(component, torch.nn.Module):
                    add(component)

    for value in vars(method).values():
        visit(value)
    return total


def device_budget_bytes(device: str) -> int:
    import torch

    if settings.ALKEMY_GPU_MEMORY_BUDGET_GB > 0:
        return int(settings.ALKEMY_GPU_MEMORY_BUDGET_GB * 2**30)
    if device.startswith("cuda"):
        return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    return 16 * 2**30


class PipelineCache:
    """Loaded methods by key, evicting the least recently used beyond the memory budget."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[GenerationMethod, int]] = OrderedDict()
        self.loads = 0

    def get(self, method_key: str) -> GenerationMethod:
        from generation.services import load_method

        key = f"{method_key}@{settings.ALKEMY_MODELS_DIR}"
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        method = load_method(method_key, options=LoadOptions.for_device())
        self.loads += 1
        self._entries[key] = (method, 0)
        self.trim()
        return method

    def _report(self) -> None:
        from alkemy.metrics import WARM_PIPELINES

        WARM_PIPELINES.set(len(self._entries))

    def trim(self) -> None:
        """Evict least recently used methods until the warm ones fit the memory budget (the newest
        always stays). Sizes are measured now, since some methods load their weights lazily."""
        budget = device_budget_bytes(LoadOptions.for_device().device)
        sizes = {key: module_bytes(method) for key, (method, _) in self._entries.items()}
        while len(self._entries) > 1 and sum(sizes[key] for key in self._entries) > budget:
            evicted, _ = self._entries.popitem(last=False)
            logger.info("evicted %s from the pipeline cache (budget %.1f GiB)", evicted, budget / 2**30)
            self.free()
        self._report()

    def clear(self) -> None:
        self._entries.clear()
        self.free()
        self._report()

    @staticmethod
    def free() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __contains__(self, method_key: str) -> bool:
        return f"{method_key}@{settings.ALKEMY_MODELS_DIR}" in self._entries


_cache: PipelineCache | None = None


def pipeline_cache() -> PipelineCache:
    global _cache
    if _cache is None:
        _cache = PipelineCache()
    return _cache


# --- one job ----------------------------------------------------------------------------------


class LeaseKeeper(threading.Thread):
    """Renews the job's lease in the background for the whole run, not only between denoising
    steps: loading real weights or waiting for a remote API can take longer than a lease."""

    def __init__(self, job_id: int, worker: str, model: type = GenerationJob) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.job_id, self.worker, self.model = job_id, worker, model  # model: any alkemy.jobs.Job
        self.interval = max(settings.ALKEMY_JOB_LEASE_SECONDS / 3, 0.5)
        self._stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self._stopped.wait(self.interval):
                try:
                    mine, _ = job_heartbeat(self.model, self.job_id, worker=self.worker)
                except CONNECTION_LOST:
                    connection.close()  # the database restarted: reconnect at the next beat
                    continue
                if not mine:
                    return  # finished, canceled or taken over: the step guard acts on it
        finally:
            connection.close()  # this thread's own database connection

    def stop(self) -> None:
        self._stopped.set()


@dataclass
class StepGuard:
    """on_step callback: cancellation, timeout, progress + heartbeat at most once a second."""

    job_id: int
    worker: str
    timeout_seconds: float
    started: float
    last_write: float = 0.0
    model: type = GenerationJob  # any alkemy.jobs.Job (training jobs use the same guard)

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        if now - self.started > self.timeout_seconds:
            raise JobTimedOut()
        write_progress = now - self.last_write >= PROGRESS_INTERVAL_SECONDS or step == total
        progress = min(step / total, 1.0) if total else 0.0
        try:
            if write_progress:
                self.last_write = now
                mine, cancel = job_heartbeat(self.model, self.job_id, worker=self.worker, progress=progress,
                                             step=step, total=total)  # fmt: skip
            else:
                mine, cancel = self._cheap_check()
        except CONNECTION_LOST:
            # The database went away (a restart): keep going and reconnect at the next step. The first check
            # that gets through says whether the job is still ours, and the finish is conditional on it too,
            # so a run the reaper gave away meanwhile keeps nothing.
            connection.close()
            return
        if not mine:
            raise JobLost()
        if cancel:
            raise JobCanceled()

    def _cheap_check(self) -> tuple[bool, bool]:
        """(still ours, cancel requested): one primary-key SELECT per step, in SQL, not through the ORM,
        whose query building cost more CPU than the query on the GPU process's critical path."""
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT status, worker, cancel_requested FROM {self.model._meta.db_table} WHERE id = %s",
                [self.job_id],
            )
            row = cursor.fetchone()
        if row is None:
            return False, False
        status, worker, cancel = row
        return status == JobStatus.RUNNING and worker == self.worker, cancel


#: methods whose concurrency is limited (remote APIs with quotas): settings per tenant and global
CONCURRENCY_LIMITS = {"gemini": ("ALKEMY_GEMINI_CONCURRENCY_PER_TENANT", "ALKEMY_GEMINI_CONCURRENCY_GLOBAL")}
DEFER_POLL_SECONDS = 1.0
DEFER_MAX_WAIT_SECONDS = 30.0


def claim_within_limits(job_id: int, me: str) -> bool | None:
    """Claim the job; None when its method is at its concurrency limit (try again later)."""
    row = GenerationJob.objects.unscoped().filter(pk=job_id).values_list("method", "tenant_id").first()
    if row is None or row[0] not in CONCURRENCY_LIMITS:
        return job_claim(GenerationJob, job_id, worker=me)
    method, tenant_id = row
    per_tenant, overall = (getattr(settings, name) for name in CONCURRENCY_LIMITS[method])
    with transaction.atomic(), connection.cursor() as cursor:
        # One claimer at a time per method, so the counts below hold until we commit.
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"alkemy-concurrency-{method}"])
        running = GenerationJob.objects.unscoped().filter(status=JobStatus.RUNNING, method=method)
        if running.count() >= overall or running.filter(tenant_id=tenant_id).count() >= per_tenant:
            return None
        return job_claim(GenerationJob, job_id, worker=me)


def cluster_stopping(wait_seconds: float = 5.0) -> bool:
    """Whether the qcluster this worker process belongs to is shutting down (its parent got SIGTERM or
    SIGINT: `docker stop`, a pod being deleted). django-q2 then lets its workers drain the tasks already
    pulled from the broker before they stop. Its sentinel, our parent process, publishes its status
    ("Stopping") in the broker's cache every cycle; while it waits to queue the workers' stop signals
    behind a pulled task it publishes nothing for a moment (its entry lapses after 3 s), so an absent
    entry is waited for, up to `wait_seconds`."""
    import multiprocessing
    import os
    import socket

    from django_q.conf import Conf
    from django_q.status import Stat

    if multiprocessing.parent_process() is None:
        return False  # not a qcluster worker (a test, `manage.py generate`, django-q's sync mode)
    sentinel, host = os.getppid(), socket.gethostname()
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            mine = [s for s in Stat.get_all() if s.sentinel == sentinel and s.host == host]
        except Exception:  # no status to read (cache down): behave as before
            return False
        if mine:
            return any(s.status == Conf.STOPPING for s in mine)
        if time.monotonic() >= deadline:
            return False  # its sentinel is gone
        time.sleep(0.1)


def run_job(job_id: int) -> str:
    """Claim and run one generation job. Returns the final status, 'skipped' if it was not ours to
    run, 'deferred' when its method stayed at its concurrency limit (the job is re-enqueued), or
    'handed_back' when the cluster is stopping: a job not started yet goes back to the queue for another
    worker instead of being started by one that is going away."""
    if cluster_stopping():
        from generation.jobs import enqueue

        enqueue(job_id)
        logger.info("job %s handed back to the queue: this cluster is stopping", job_id)
        return "handed_back"
    me = worker_id()
    waited = 0.0
    while (claimed := claim_within_limits(job_id, me)) is None:
        if waited >= DEFER_MAX_WAIT_SECONDS:
            from generation.jobs import enqueue

            enqueue(job_id)
            return "deferred"
        time.sleep(DEFER_POLL_SECONDS)
        waited += DEFER_POLL_SECONDS
    if not claimed:
        logger.info("job %s not claimed (already taken, finished or canceled)", job_id)
        return "skipped"
    job = GenerationJob.objects.unscoped().select_related("character").get(pk=job_id)
    with tenant_scope(job.tenant_id):
        _notify(job, JobStatus.RUNNING)
        return _run_claimed(job, me)


def _run_claimed(job: GenerationJob, me: str) -> str:
    guard = StepGuard(job.pk, me, settings.ALKEMY_METHOD_TIMEOUT_SECONDS, time.monotonic())
    keeper = LeaseKeeper(job.pk, me)
    keeper.start()
    try:
        return _generate_and_store(job, me, guard)
    finally:
        keeper.stop()


def _generate_and_store(job: GenerationJob, me: str, guard: StepGuard) -> str:
    import torch

    from generation.services import generate_for_character

    device_seconds = 0.0
    usage: dict = {}  # what a remote method metered (tokens), kept for billing when the job fails too
    try:
        method = pipeline_cache().get(job.method)
        request = GenerationRequest(
            references=[], prompt=job.prompt, negative_prompt=job.negative_prompt, width=job.width,
            height=job.height, steps=job.steps, guidance=job.guidance, seed=job.seed,
            num_images=job.num_images, params=run_params(job), credentials=run_credentials(job), usage=usage,
        )  # fmt: skip
        device_started = time.monotonic()
        outputs = generate_for_character(
            character=job.character, method=method, request=request, on_step=guard,
            needs_references=job.method in IDENTITY_METHODS, with_png=True,
        )  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        device_seconds = time.monotonic() - device_started
    except JobCanceled:
        return _finish(job, me, JobStatus.CANCELED, "canceled", "Canceled while running.", device_seconds, usage=usage)
    except JobLost:
        logger.warning("job %s: lease lost to another worker; dropping this run", job.pk)
        return "lost"
    except JobTimedOut:
        return _finish(
            job,
            me,
            JobStatus.FAILED,
            "timeout",
            f"The method ran longer than {settings.ALKEMY_METHOD_TIMEOUT_SECONDS}s.",
            device_seconds,
        )
    except torch.cuda.OutOfMemoryError as exc:
        pipeline_cache().clear()
        return _finish(job, me, JobStatus.FAILED, "gpu_out_of_memory", str(exc)[:1000], device_seconds)
    except AlkemyError as exc:
        return _finish(job, me, JobStatus.FAILED, exc.code, exc.message, device_seconds, exc.details, usage=usage)
    except Exception as exc:  # a bug in a method must fail the job, not kill the worker
        if is_out_of_memory(exc):  # host memory (CPU runs, offloading): free what we can and keep serving
            pipeline_cache().clear()
            message = f"Out of memory: {exc}" if str(exc) else "Out of memory."
            return _finish(job, me, JobStatus.FAILED, "out_of_memory", message[:1000], device_seconds)
        logger.exception("job %s failed", job.pk)
        return _finish(job, me, JobStatus.FAILED, "internal_error", f"{type(exc).__name__}: {exc}", device_seconds)
    pipeline_cache().trim()  # weights loaded during the run count from now on
    return _store_outputs(job, me, outputs, device_seconds, request.usage)


def is_out_of_memory(exc: BaseException) -> bool:
    """Host memory ran out: Python's MemoryError, or torch's CPU allocator refusing an allocation."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def run_params(job: GenerationJob) -> dict:
    """The method parameters of a run: the job's own, plus the LoRA files it refers to."""
    from generation.jobs import RESERVED_PARAMS

    params = {key: value for key, value in job.params.items() if key not in RESERVED_PARAMS}
    if job.lora_id:
        lora = job.lora
        params.update(
            # the id names the exact file: warm adapters are reused only for the very same weights
            base_model=lora.base_model, lora_path=local_path(lora.file), lora_id=f"artifact-{lora.pk}-{lora.sha256}",
            trigger_token=lora.trigger_token,
        )  # fmt: skip
        if job.style_lora_id:
            style = job.style_lora
            params.update(style_lora_path=local_path(style.file), style_lora_id=f"style-{style.pk}-{style.sha256}")
            if style.trigger_token:
                params.setdefault("style_trigger_token", style.trigger_token)
    return params


def run_credentials(job: GenerationJob) -> dict:
    """Secrets for remote methods, decrypted only here, never stored on the job."""
    from alkemy.tenancy.models import Tenant
    from alkemy.tenancy.services import tenant_gemini_key

    if job.method != "gemini":
        return {}
    key = tenant_gemini_key(Tenant.objects.get(pk=job.tenant_id))
    return {"gemini_api_key": key} if key else {}


def local_path(field_file) -> str:
    """A local file path for a stored file (downloaded once into a cache for remote storages)."""
    try:
        return field_file.path
    except NotImplementedError:
        import tempfile
        from pathlib import Path

        cached = Path(tempfile.gettempdir()) / "alkemy-cache" / field_file.name
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            with field_file.open("rb") as source:
                cached.write_bytes(source.read())
        return str(cached)


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def _character_held(job: GenerationJob) -> bool:
    """Inside the finishing transaction, before the job row: hold the job's character FOR KEY SHARE.

    Deleting the character (which cascades to the job) waits for the finish to commit, and then
    sees its outputs; a character deleted first is reported gone and the finish writes nothing.
    Locks are taken character first, then job, the order a deleter that locks its character uses.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT 1 FROM {Character._meta.db_table} WHERE id = %s FOR KEY SHARE",
            [job.character_id],
        )
        return cursor.fetchone() is not None


#: a write refused for lack of room: no space, a quota, the file size limit
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _save_file(name: str, content: bytes) -> str:
    """Store one file; a write that fails part-way (a full disk) leaves no partial file behind."""
    name = default_storage.get_available_name(name)  # names carry the job and worker: nobody else's file
    try:
        return default_storage.save(name, ContentFile(content))
    except BaseException:
        try:
            default_storage.delete(name)
        except OSError:
            logger.exception("could not remove the partial file %s", name)
        raise


#: how long a finishing transaction is retried while the database is unreachable
FINISH_RETRY_SECONDS = 60.0


def _reconnecting(finish):
    """Run a finishing transaction; when the database connection is lost (a restart), reconnect and try
    again for a while. The finish is conditional on holding the job, so a retry never finishes it twice;
    if the database stays away, the job is left to the reaper."""
    deadline = time.monotonic() + FINISH_RETRY_SECONDS
    while True:
        try:
            return finish()
        except CONNECTION_LOST:
            connection.close()
            if time.monotonic() > deadline:
                raise
            logger.warning("database connection lost while finishing a job; retrying")
            time.sleep(0.5)


def _store_outputs(job: GenerationJob, me: str, outputs, device_seconds: float, usage: dict) -> str:
    """Store the outputs' PNGs (encoded while the images were generated, see `generate_for_character`)
    and finish the job in one transaction; files of a run that does not finish are deleted. Storage that
    refuses a file (a full disk) fails the job `storage_full` (`storage_error` for other I/O errors)."""
    from generation.services import encode_png

    stored: list[str] = []
    try:
        for index, output in enumerate(outputs):
            png = output.png if output.png is not None else encode_png(output.image)
            name = f"tenants/{job.tenant_id}/generations/{job.pk}/{index}-seed{output.seed}-{me.replace(':', '-')}.png"
            stored.append(_save_file(name, png))
    except OSError as exc:
        for name in stored:
            default_storage.delete(name)
        logger.error("job %s: could not store its outputs: %s", job.pk, exc)
        code = "storage_full" if exc.errno in STORAGE_FULL_ERRNOS else "storage_error"
        message = f"Could not store the outputs: {exc.strerror or exc}."
        return _finish(job, me, JobStatus.FAILED, code, message, device_seconds, usage=usage)
    except BaseException:
        for name in stored:
            default_storage.delete(name)
        raise

    def finish() -> None:
        with transaction.atomic():
            if not _character_held(job):
                raise JobLost()
            finished = job_finish(GenerationJob, job.pk, worker=me, status=JobStatus.SUCCEEDED,
                                  device=_device_name(), device_seconds=round(device_seconds, 3),
                                  usage={**usage, "images": len(outputs)})  # fmt: skip
            if not finished:
                raise JobLost()
            usage_record_job(job=job)  # the ledger, in the transaction that finishes the job
            GeneratedImage.objects.unscoped().bulk_create(
                [
                    GeneratedImage(
                        tenant_id=job.tenant_id, job=job, index=index, file=name, seed=output.seed,
                        width=output.image.width, height=output.image.height,
                        identity_similarity=output.score.similarity, identity_reason=output.score.reason or "",
                        face_box=list(output.score.face_box) if output.score.face_box else None,
                    )
                    for index, (output, name) in enumerate(zip(outputs, stored, strict=True))
                ]
            )  # fmt: skip
            _notify(job, JobStatus.SUCCEEDED)

    try:
        _reconnecting(finish)
    except JobLost:
        if GeneratedImage.objects.unscoped().filter(job_id=job.pk, file__in=stored).exists():
            return JobStatus.SUCCEEDED  # our commit went through just before the connection broke
        for name in stored:
            default_storage.delete(name)
        logger.warning("job %s was finished elsewhere or deleted; discarded this worker's outputs", job.pk)
        return "lost"
    except IntegrityError:
        # A row the finish refers to (a webhook endpoint, the tenant) was deleted as it committed. Nothing
        # was written; the job stays running until its lease expires and the reaper takes it back.
        for name in stored:
            default_storage.delete(name)
        logger.warning("job %s: a related row was deleted while it finished; discarded its outputs", job.pk)
        return "lost"
    except BaseException:
        for name in stored:
            default_storage.delete(name)
        raise
    return JobStatus.SUCCEEDED


def _finish(
    job: GenerationJob,
    me: str,
    status: str,
    code: str,
    message: str,
    device_seconds: float,
    details: dict | None = None,
    usage: dict | None = None,
) -> str:
    def finish() -> str:
        with transaction.atomic():
            if not _character_held(job):
                logger.warning("job %s was deleted with its character while it ran", job.pk)
                return "lost"
            finished = job_finish(
                GenerationJob, job.pk, worker=me, status=status, error_code=code, error_message=message,
                error_details=details, device=_device_name(), device_seconds=round(device_seconds, 3),
                **({"usage": usage} if usage else {}),
            )  # fmt: skip
            if finished:
                usage_record_job(job=job)  # the failure policy decides what is billable
                _notify(job, status)
                return status
        return "lost"

    try:
        return _reconnecting(finish)
    except IntegrityError:  # as in _store_outputs: the reaper takes the job back
        logger.warning("job %s: a related row was deleted while it finished as %s", job.pk, status)
    return "lost"


def _notify(job: GenerationJob, status: str) -> None:
    from generation.jobs import notify

    notify(job, status)
