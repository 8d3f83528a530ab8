"""`manage.py train_lora`: train a character's LoRA in this process, as a GPU worker would (operators)."""

import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from alkemy.errors import AlkemyError
from alkemy.jobs import JobStatus
from alkemy.tenancy.scoping import all_tenants
from characters.models import Character
from training.jobs import LR_SCHEDULES, training_submit
from training.models import BaseModel, TrainingJob
from training.worker import run_training_job


class Command(BaseCommand):
    help = (
        "Train a LoRA of a character from its reference photos in this process (the same trainer and job "
        "the GPU workers run), with a progress bar; the LoRA becomes the character's next version."
    )

    def add_arguments(self, parser):
        parser.add_argument("--character", type=int, required=True, help="Character id")
        parser.add_argument("--base", choices=BaseModel.values, required=True, help="Base model")
        parser.add_argument("--steps", type=int, default=None, help="default 1000")
        parser.add_argument("--rank", type=int, default=16)
        parser.add_argument("--alpha", type=float, default=None, help="default = rank")
        parser.add_argument("--learning-rate", type=float, default=None, help="default 1e-4")
        parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
        parser.add_argument("--warmup-steps", type=int, default=None)
        parser.add_argument("--resolution", type=int, default=1024)
        parser.add_argument("--trigger-token", default=None, help="default ohwx_<slug>")
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--validation-prompt", default="")
        parser.add_argument("--models-dir", type=Path, default=None, help="default: $ALKEMY_MODELS_DIR")

    def handle(self, *args, **o):
        if o["models_dir"]:
            settings.ALKEMY_MODELS_DIR = o["models_dir"]
        with all_tenants():
            character = Character.objects.filter(pk=o["character"]).select_related("tenant").first()
        if character is None:
            raise CommandError(f"No character with id {o['character']}.")
        try:
            job, _ = training_submit(
                tenant=character.tenant, character=character, base_model=o["base"], steps=o["steps"],
                rank=o["rank"], alpha=o["alpha"], learning_rate=o["learning_rate"], lr_schedule=o["lr_schedule"],
                warmup_steps=o["warmup_steps"], resolution=o["resolution"], trigger_token=o["trigger_token"],
                seed=o["seed"], validation_prompt=o["validation_prompt"], enqueue=False,
            )  # fmt: skip
        except AlkemyError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        self.stdout.write(f"Training #{job.pk}: {job.base_model} LoRA of {character.name}, {job.steps} steps")
        started = time.monotonic()
        status = run_training_job(job.pk, progress=self._bar)
        if getattr(self, "_progress", None) is not None:
            self._progress.close()
        job = TrainingJob.objects.unscoped().select_related("lora").get(pk=job.pk)
        if status != JobStatus.SUCCEEDED:
            raise CommandError(f"Training #{job.pk} {job.status}: {job.error_code} {job.error_message}")
        self.stdout.write(
            f"LoRA v{job.lora.version} ({'selected' if job.lora.is_selected else 'not selected'}), "
            f"trigger {job.trigger_token!r}, final loss {job.loss:.4f}, {job.steps_per_second:.2f} steps/s"
        )
        self.stdout.write(f"{job.lora.file.path}")
        self.stdout.write(f"Done in {time.monotonic() - started:.1f}s")

    def _bar(self, step: int, total: int, loss: float | None) -> None:
        from tqdm import tqdm

        if getattr(self, "_progress", None) is None:
            self._progress = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
        if loss is not None:
            self._progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._progress.total, self._progress.n = total, step
        self._progress.refresh()
