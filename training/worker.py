"""What runs inside a GPU worker for one training job (and in-process for `manage.py train_lora`).

The generation worker's machinery is reused as is: the conditional claim, the background lease keeper,
and the step guard (timeout, cancellation between steps, progress + heartbeat at most once a second).
On top of it:

- A checkpoint every `ALKEMY_TRAINING_CHECKPOINT_STEPS` steps goes to the job's storage folder and is
  named on the job row (only while this worker still holds the job). A job the reaper re-queued after
  its worker died resumes from that checkpoint (`resumed_from_step`) and still ends at exactly `steps`.
- The loss is written when the trainer reads it back (every `ALKEMY_TRAINING_LOG_STEPS` steps).
- Success stores the LoRA as the character's next `LoraArtifact` version (selected when the character
  has none selected), the optional validation render, the usage, and finishes the job, all in one
  transaction conditional on this worker still holding the job. Cancel keeps no artifact. Checkpoints
  are deleted once the job has ended.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Max

from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus, job_claim, job_finish, worker_id
from alkemy.tenancy.scoping import tenant_scope
from characters.models import Character
from generation.worker import (
    JobCanceled,
    JobLost,
    JobTimedOut,
    LeaseKeeper,
    PipelineCache,
    StepGuard,
    _device_name,
    pipeline_cache,
)
from training.jobs import notify
from training.models import LoraArtifact, TrainingJob, lora_upload_to
from training.trainer import TrainingConfig, load_checkpoint, reference_examples, save_lora_file, train
from training.trainer.loop import checkpoint_bytes
from usage.services import usage_record_job

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float | None], None]


def training_setting(name: str, default):
    return getattr(settings, f"ALKEMY_TRAINING_{name}", default)


def run_training_job(job_id: int, *, progress: ProgressCallback | None = None) -> str:
    """Claim and run one training job. Returns the final status, or 'skipped' if it was not ours to run."""
    me = worker_id()
    if not job_claim(TrainingJob, job_id, worker=me):
        logger.info("training %s not claimed (already taken, finished or canceled)", job_id)
        return "skipped"
    job = TrainingJob.objects.unscoped().select_related("character").get(pk=job_id)
    with tenant_scope(job.tenant_id):
        notify(job, JobStatus.RUNNING)
        keeper = LeaseKeeper(job.pk, me, model=TrainingJob)
        keeper.start()
        try:
            return _train_and_store(job, me, progress)
        finally:
            keeper.stop()


def training_config(job: TrainingJob) -> TrainingConfig:
    return TrainingConfig(
        base_model=job.base_model, models_dir=settings.ALKEMY_MODELS_DIR, steps=job.steps, rank=job.rank,
        alpha=job.alpha, learning_rate=job.learning_rate, lr_schedule=job.lr_schedule,
        warmup_steps=job.warmup_steps, resolution=job.resolution, seed=job.seed,
        checkpoint_every=int(training_setting("CHECKPOINT_STEPS", 250)),
        log_every=int(training_setting("LOG_STEPS", 10)),
        gradient_checkpointing=bool(training_setting("GRADIENT_CHECKPOINTING", False)),
        compile_blocks=bool(training_setting("COMPILE", False)),
    )  # fmt: skip


class RunRecorder:
    """The trainer's callbacks for one job: guard each step, write the loss, store checkpoints."""

    def __init__(self, job: TrainingJob, me: str, progress: ProgressCallback | None) -> None:
        timeout = float(training_setting("TIMEOUT_SECONDS", 3300))
        self.job, self.me, self.progress = job, me, progress
        self.guard = StepGuard(job.pk, me, timeout, time.monotonic(), model=TrainingJob)
        self.checkpoint_file = job.checkpoint_file
        self.history: list = []
        self.last_step = 0
        self._rate_from: tuple[int, float] | None = None

    def mine(self):
        return TrainingJob.objects.unscoped().filter(pk=self.job.pk, status=JobStatus.RUNNING, worker=self.me)

    def on_step(self, step: int, total: int, loss: float | None) -> None:
        self.guard(step, total)  # raises on cancel, lost lease or timeout
        self.last_step = step
        now = time.monotonic()
        if self._rate_from is None:
            self._rate_from = (step - 1, now)
        if loss is not None:
            self.history.append([step, round(loss, 6)])
            done, since = self._rate_from
            rate = (step - done) / (now - since) if now > since else None
            self.mine().update(loss=loss, loss_history=self.history, steps_per_second=rate)
        if self.progress is not None:
            self.progress(step, total, loss)

    def on_checkpoint(self, step: int, state: dict) -> None:
        name = default_storage.save(
            f"tenants/{self.job.tenant_id}/trainings/{self.job.pk}/checkpoint-{step:06d}.pt",
            ContentFile(checkpoint_bytes(state)),
        )
        if not self.mine().update(checkpoint_file=name, checkpoint_step=step):
            default_storage.delete(name)
            raise JobLost()
        previous, self.checkpoint_file = self.checkpoint_file, name
        if previous:
            default_storage.delete(previous)

    def resume_point(self, config: TrainingConfig) -> dict | None:
        """The checkpoint an earlier attempt left, when it fits this job (else None: start over)."""
        if not self.job.checkpoint_file:
            return None
        try:
            with default_storage.open(self.job.checkpoint_file, "rb") as handle:
                state = load_checkpoint(handle.read(), config)
        except Exception:  # noqa: BLE001 - a missing or corrupt checkpoint only costs the steps it held
            logger.exception("training %s: checkpoint %s unreadable; starting over", self.job.pk,
                             self.job.checkpoint_file)  # fmt: skip
            return None
        if state is not None:
            self.history = [list(item) for item in state["loss_history"]]
            self.last_step = int(state["step"])
            self.mine().update(resumed_from_step=state["step"])
            logger.info("training %s resumes from its checkpoint at step %s", self.job.pk, state["step"])
        return state


def _train_and_store(job: TrainingJob, me: str, progress: ProgressCallback | None) -> str:
    import torch

    recorder = RunRecorder(job, me, progress)
    started = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - started

    try:
        if torch.cuda.is_available():
            pipeline_cache().clear()  # the trainer needs the card; warm generation pipelines reload later
        config = training_config(job)
        checkpoint = recorder.resume_point(config)
        examples = reference_examples(character=job.character, resolution=job.resolution,
                                      trigger_token=job.trigger_token, captions=job.captions)  # fmt: skip
        if not examples:
            raise AlkemyError("The character has no reference photo left to train on.", code="no_references",
                              field="character", status_code=422)  # fmt: skip
        result = train(config, examples, on_step=recorder.on_step, checkpoint=checkpoint,
                       on_checkpoint=recorder.on_checkpoint)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix=f"alkemy-training-{job.pk}-") as scratch:
            saving = time.monotonic()
            path = save_lora_file(Path(scratch) / "lora.safetensors", config, result)
            data = path.read_bytes()
            result.timings["save"] = round(time.monotonic() - saving, 3)
            validation = None
            if job.validation_prompt:
                validation = _validation_render(job, path, hashlib.sha256(data).hexdigest())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        device_seconds = elapsed()
    except JobCanceled:
        return _finish(job, me, JobStatus.CANCELED, "canceled", "Canceled while training.", elapsed(), recorder)
    except JobLost:
        logger.warning("training %s: lease lost to another worker; dropping this run", job.pk)
        return "lost"
    except JobTimedOut:
        return _finish(job, me, JobStatus.FAILED, "timeout",
                       f"Training ran longer than {training_setting('TIMEOUT_SECONDS', 3300)}s.", elapsed(),
                       recorder)  # fmt: skip
    except torch.cuda.OutOfMemoryError as exc:
        pipeline_cache().clear()
        return _finish(job, me, JobStatus.FAILED, "gpu_out_of_memory", str(exc)[:1000], elapsed(), recorder)
    except AlkemyError as exc:
        return _finish(job, me, JobStatus.FAILED, exc.code, exc.message, elapsed(), recorder, exc.details)
    except Exception as exc:  # a bug must fail the job, not kill the worker
        logger.exception("training %s failed", job.pk)
        return _finish(job, me, JobStatus.FAILED, "internal_error", f"{type(exc).__name__}: {exc}", elapsed(),
                       recorder)  # fmt: skip
    finally:
        PipelineCache.free()  # the trainer's denoiser and optimizer state go back to the card's pool
    return _store_result(job, me, result, data, validation, device_seconds)


def _validation_render(job: TrainingJob, lora_path: Path, sha256: str):
    """One image of `validation_prompt` with the new LoRA (the `lora` method), identity-scored; None on failure."""
    from generation.methods.base import GenerationRequest
    from generation.services import generate_for_character

    request = GenerationRequest(
        references=[], prompt=job.validation_prompt, width=job.resolution, height=job.resolution,
        steps=training_setting("VALIDATION_STEPS", None), seed=job.seed,
        params={"base_model": job.base_model, "lora_path": str(lora_path), "lora_id": f"training-{job.pk}-{sha256}",
                "trigger_token": job.trigger_token},
    )  # fmt: skip
    try:
        method = pipeline_cache().get("lora")
        return generate_for_character(character=job.character, method=method, request=request,
                                      needs_references=False)[0]  # fmt: skip
    except (JobCanceled, JobLost, JobTimedOut):
        raise
    except Exception:  # noqa: BLE001 - the LoRA is good whether or not its preview renders
        logger.exception("training %s: validation render failed", job.pk)
        return None


def _store_result(job: TrainingJob, me: str, result, data: bytes, validation, device_seconds: float) -> str:
    from generation.lora import inspect_lora

    info = inspect_lora(data, job.base_model, settings.ALKEMY_MODELS_DIR)  # our own output must load as uploads do
    sha256 = hashlib.sha256(data).hexdigest()
    stored: list[str] = []
    try:
        artifact = LoraArtifact(tenant_id=job.tenant_id, sha256=sha256)
        stored.append(default_storage.save(lora_upload_to(artifact, ""), ContentFile(data)))
        validation_fields = {}
        if validation is not None:
            buffer = io.BytesIO()
            validation.image.save(buffer, "PNG")
            name = f"tenants/{job.tenant_id}/trainings/{job.pk}/validation-seed{validation.seed}.png"
            stored.append(default_storage.save(name, ContentFile(buffer.getvalue())))
            validation_fields = {"validation_image": stored[-1],
                                 "validation_identity_similarity": validation.score.similarity,
                                 "validation_identity_reason": validation.score.reason or ""}  # fmt: skip
        with transaction.atomic():
            Character.objects.unscoped().select_for_update().filter(pk=job.character_id).first()
            versions = LoraArtifact.objects.unscoped().filter(character_id=job.character_id)
            select = not versions.filter(is_selected=True).exists()
            artifact = LoraArtifact.objects.unscoped().create(
                tenant_id=job.tenant_id, character_id=job.character_id,
                version=(versions.aggregate(v=Max("version"))["v"] or 0) + 1, base_model=job.base_model,
                file=stored[0], sha256=sha256, file_size=len(data), lora_format=info.format, rank=info.rank,
                trigger_token=job.trigger_token, source="trained", is_selected=select,
                metadata={"base_model": job.base_model, "rank": job.rank, "alpha": job.alpha,
                          "trigger_token": job.trigger_token, "steps": result.steps, "resolution": job.resolution,
                          "learning_rate": job.learning_rate, "seconds": round(device_seconds, 3),
                          "final_loss": result.final_loss, "training_job": job.pk, "timings": result.timings,
                          "resumed_from_step": result.resumed_from_step},
                created_by_id=job.requested_by_id,
            )  # fmt: skip
            finished = job_finish(
                TrainingJob, job.pk, worker=me, status=JobStatus.SUCCEEDED, lora=artifact, current_step=job.steps,
                total_steps=job.steps, device=_device_name(), device_seconds=round(device_seconds, 3),
                usage={"steps": job.steps, "device_seconds": round(device_seconds, 3)}, loss=result.final_loss,
                loss_history=result.loss_history, steps_per_second=result.steps_per_second,
                timings=result.timings, **validation_fields,
            )  # fmt: skip
            if not finished:
                raise JobLost()
            usage_record_job(job=job)  # the ledger, in the transaction that finishes the job
            notify(job, JobStatus.SUCCEEDED)
    except JobLost:
        _delete(stored)
        logger.warning("training %s finished elsewhere; discarded this worker's LoRA", job.pk)
        return "lost"
    except BaseException:
        _delete(stored)
        raise
    delete_checkpoint(job.pk)
    return JobStatus.SUCCEEDED


def _finish(job, me, status, code, message, device_seconds, recorder: RunRecorder, details=None) -> str:
    with transaction.atomic():
        finished = job_finish(
            TrainingJob, job.pk, worker=me, status=status, error_code=code, error_message=message,
            error_details=details, device=_device_name(), device_seconds=round(device_seconds, 3),
            usage={"steps": recorder.last_step, "device_seconds": round(device_seconds, 3)},
        )  # fmt: skip
        if finished:
            usage_record_job(job=job)  # the ledger, in the transaction that finishes the job
            notify(job, status)
    if not finished:
        return "lost"
    delete_checkpoint(job.pk)
    return status


def delete_checkpoint(job_id: int) -> None:
    """An ended job cannot resume: its checkpoint goes (after commit)."""
    name = TrainingJob.objects.unscoped().filter(pk=job_id).values_list("checkpoint_file", flat=True).first()
    if name:
        TrainingJob.objects.unscoped().filter(pk=job_id).update(checkpoint_file="")
        transaction.on_commit(lambda: _delete([name]))


def _delete(names: list[str]) -> None:
    for name in names:
        try:
            if not LoraArtifact.objects.unscoped().filter(file=name).exists():  # LoRA files are shared by hash
                default_storage.delete(name)
        except OSError:
            logger.exception("could not delete %s", name)
