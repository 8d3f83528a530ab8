"""`manage.py compare_methods`: LoRA or zero-shot? A shot list of the given characters × methods × prompts,
run through the job system (or in this process with `--inline`), written out as a table, CSV, JSON, the
contact sheet and a chart. See docs/method-comparison.md."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from alkemy.errors import AlkemyError
from alkemy.jobs import TERMINAL, JobStatus
from characters.models import Character
from generation.methods import METHODS
from generation.models import GenerationJob
from shotlists.charts import render_chart
from shotlists.contact_sheet import render_contact_sheet
from shotlists.report import report_csv, shotlist_report
from shotlists.services import ShotSpec, shotlist_submit


def _ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--characters takes ids separated by commas, not {text!r}.") from None


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CommandError(f"Cannot read {path}: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CommandError(f"{path} holds no prompts (one per line).")
    return prompts


class Command(BaseCommand):
    help = (
        "Compare generation methods on your characters: renders every character × method × prompt as a shot "
        "list and writes a terminal table, report.csv, report.json, contact_sheet.png and chart.png."
    )

    def add_arguments(self, parser):
        parser.add_argument("--characters", required=True, help="Character ids, comma-separated (one tenant)")
        parser.add_argument("--prompts", type=Path, required=True, help="A text file, one prompt (shot) per line")
        parser.add_argument("--methods", default="pulid_flux,instantid_sdxl,lora,gemini",
                            help="Comma-separated methods (default: all four)")  # fmt: skip
        parser.add_argument("--seeds", type=int, default=1, help="Images (seeds) per shot, default 1")
        parser.add_argument("--out", type=Path, default=None, help="Output folder (default ./compare-<shot list id>)")
        parser.add_argument("--inline", action="store_true", help="Run the jobs in this process, not on workers")
        parser.add_argument("--train-lora", action="store_true",
                            help="Train a LoRA first for characters that have none (lora method)")  # fmt: skip
        parser.add_argument("--lora-base", choices=["sdxl", "flux"], default="sdxl", help="Base of a trained LoRA")
        parser.add_argument("--lora-steps", type=int, default=None, help="Training steps (default 1000)")
        parser.add_argument("--lora-resolution", type=int, default=1024, help="Training resolution")
        parser.add_argument("--width", type=int, default=1024)
        parser.add_argument("--height", type=int, default=1024)
        parser.add_argument("--steps", type=int, default=None, help="Denoising steps (default: each method's)")
        parser.add_argument("--seed", type=int, default=None, help="First seed of every shot (default: random)")
        parser.add_argument("--name", default=None, help="Shot list name")
        parser.add_argument("--timeout", type=float, default=3600, help="Seconds to wait for the workers")
        parser.add_argument("--models-dir", type=Path, default=None, help="default: $ALKEMY_MODELS_DIR")

    def handle(self, *args, **o):
        if o["models_dir"]:
            settings.ALKEMY_MODELS_DIR = o["models_dir"]
        methods = [m.strip() for m in o["methods"].split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise CommandError(f"Unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}.")
        characters = self._characters(_ids(o["characters"]))
        prompts = read_prompts(o["prompts"])
        training_seconds = {}
        if "lora" in methods:
            training_seconds = self._ensure_loras(characters, o)

        shots = [ShotSpec(prompt=p, width=o["width"], height=o["height"], steps=o["steps"], seed=o["seed"])
                 for p in prompts]  # fmt: skip
        name = o["name"] or f"compare_methods {timezone.now():%Y-%m-%d %H:%M}"
        try:
            shot_list, _ = shotlist_submit(tenant=characters[0].tenant, name=name, characters=characters,
                                           methods=methods, shots=shots, images_per_shot=o["seeds"])  # fmt: skip
        except AlkemyError as exc:
            raise CommandError(f"{exc.code}: {exc.message} {exc.details}") from None
        jobs = GenerationJob.objects.unscoped().filter(shot_job__shot_list=shot_list).order_by("pk")
        self.stdout.write(f"Shot list #{shot_list.pk}: {len(characters)} character(s) × {len(methods)} method(s) × "
                          f"{len(prompts)} shot(s) = {jobs.count()} jobs")  # fmt: skip
        started = time.monotonic()
        if o["inline"]:
            self._run_inline(list(jobs.values_list("pk", flat=True)))
        else:
            self._wait(jobs, o["timeout"])
        wall = time.monotonic() - started

        report = shotlist_report(shot_list=shot_list)
        report["wall_seconds"] = round(wall, 3)
        report["lora_training_wall_seconds"] = training_seconds or None
        out = o["out"] or Path(f"compare-{shot_list.pk}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
        (out / "report.csv").write_text(report_csv(report), encoding="utf-8")
        (out / "contact_sheet.png").write_bytes(render_contact_sheet(shot_list=shot_list, report=report))
        (out / "chart.png").write_bytes(render_chart(report))
        self.stdout.write(self._table(report))
        self.stdout.write(f"Wrote report.json, report.csv, contact_sheet.png, chart.png to {out} ({wall:.1f}s)")

    # --- steps -----------------------------------------------------------------------------------------

    def _characters(self, ids: list[int]) -> list[Character]:
        if not ids:
            raise CommandError("Name at least one character.")
        found = {c.pk: c for c in Character.objects.unscoped().filter(pk__in=ids).select_related("tenant")}
        missing = [i for i in ids if i not in found]
        if missing:
            raise CommandError(f"No character with id {', '.join(map(str, missing))}.")
        if len({c.tenant_id for c in found.values()}) > 1:
            raise CommandError("The characters belong to different tenants; compare one tenant's characters.")
        return [found[i] for i in ids]

    def _ensure_loras(self, characters: list[Character], o) -> dict[int, float]:
        """Train a LoRA for every character without a selected one (`--train-lora`), else refuse."""
        from training.jobs import training_submit
        from training.models import LoraArtifact, TrainingJob
        from training.worker import run_training_job

        seconds = {}
        for character in characters:
            if LoraArtifact.objects.unscoped().filter(character=character, is_selected=True).exists():
                continue
            if not o["train_lora"]:
                raise CommandError(f"{character.name} (#{character.pk}) has no LoRA: pass --train-lora, or leave "
                                   "lora out of --methods.")  # fmt: skip
            try:
                job, _ = training_submit(
                    tenant=character.tenant, character=character, base_model=o["lora_base"], steps=o["lora_steps"],
                    resolution=o["lora_resolution"], enqueue=not o["inline"],
                )  # fmt: skip
            except AlkemyError as exc:
                raise CommandError(f"{character.name}: {exc.code}: {exc.message}") from None
            self.stdout.write(f"Training #{job.pk}: {job.base_model} LoRA of {character.name}, {job.steps} steps")
            started = time.monotonic()
            if o["inline"]:
                run_training_job(job.pk)
            else:
                self._wait(TrainingJob.objects.unscoped().filter(pk=job.pk), o["timeout"])
            job.refresh_from_db()
            if job.status != JobStatus.SUCCEEDED:
                raise CommandError(f"Training #{job.pk} {job.status}: {job.error_code} {job.error_message}")
            seconds[character.pk] = round(time.monotonic() - started, 3)
        return seconds

    def _run_inline(self, job_ids: list[int]) -> None:
        """Run each job here, as a worker would. The queue still holds their tasks (submission enqueues on
        commit); a worker that receives one later finds the job finished and skips it (the claim is conditional)."""
        from generation.worker import run_job

        for number, job_id in enumerate(job_ids, 1):
            status = run_job(job_id)
            sys.stderr.write(f"\rjob {number}/{len(job_ids)}: #{job_id} {status}   ")
            sys.stderr.flush()
        sys.stderr.write("\n")

    def _wait(self, jobs, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            statuses = list(jobs.values_list("status", flat=True))
            done = sum(status in TERMINAL for status in statuses)
            sys.stderr.write(f"\r{done}/{len(statuses)} finished")
            sys.stderr.flush()
            if done == len(statuses):
                sys.stderr.write("\n")
                return
            if time.monotonic() > deadline:
                raise CommandError(f"{len(statuses) - done} job(s) still unfinished after {timeout:.0f}s; are the "
                                   "workers running (manage.py qcluster, Q_CLUSTER_NAME=gpu)?")  # fmt: skip
            time.sleep(1)

    # --- the terminal table ----------------------------------------------------------------------------

    def _table(self, report: dict) -> str:
        def num(value, digits=3):
            return "-" if value is None else f"{float(value):.{digits}f}"

        header = ["character", "method", "imgs", "id mean", "id min", "id p10", "cons mean", "cons min", "same",
                  "outliers", "s/img p50", "s/img p90", "device s", "$/img", "train s/img", "train $/img",
                  "errors"]  # fmt: skip
        lines = [header]
        for row in report["rows"]:
            training = row.get("training") or {}
            lines.append([
                row["character"]["name"] if row["character"] else "?", row["method"], str(row["outputs"]),
                num(row["identity"]["mean"]), num(row["identity"]["min"]), num(row["identity"]["p10"]),
                num(row["consistency"]["mean"]), num(row["consistency"]["min"]), num(row["same_person_share"], 2),
                str(len(row["outliers"])), num(row["seconds_per_image"]["p50"], 2),
                num(row["seconds_per_image"]["p90"], 2), num(row["device_seconds"], 1), num(row["cost_per_image"], 6),
                num(training.get("amortised_seconds_per_image"), 2), num(training.get("amortised_cost_per_image"), 6),
                str(len(row["errors"])),
            ])  # fmt: skip
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        threshold = report["same_person_threshold"]
        text.append(f"identity: cosine to the character's identity ({report['embedder']}); cons: cross-shot pairs; "
                    f"same: share at or above {threshold}")  # fmt: skip
        return "\n".join(text)
