"""`manage.py generate`: run a method for a character in this process (operators' smoke test)."""

import sys
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from alkemy.errors import AlkemyError
from alkemy.tenancy.scoping import all_tenants
from characters.models import Character
from generation.methods import DEFAULT_METHOD, METHODS
from generation.methods.base import GenerationRequest, LoadOptions
from generation.services import generate_for_character, load_method


class Command(BaseCommand):
    help = "Generate images of a character synchronously, write PNGs and print their identity scores."

    def add_arguments(self, parser):
        parser.add_argument("--character", type=int, required=True, help="Character id")
        parser.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD)
        parser.add_argument("--prompt", required=True)
        parser.add_argument("--negative-prompt", default="")
        parser.add_argument("--steps", type=int, default=None)
        parser.add_argument("--guidance", type=float, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--width", type=int, default=1024)
        parser.add_argument("--height", type=int, default=1024)
        parser.add_argument("--num-images", type=int, default=1)
        parser.add_argument("--out", type=Path, required=True, help="Folder for the PNGs")
        parser.add_argument("--models-dir", type=Path, default=None, help="default: $ALKEMY_MODELS_DIR")
        parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")

    def handle(self, *args, **o):
        with all_tenants():
            character = Character.objects.filter(pk=o["character"]).first()
        if character is None:
            raise CommandError(f"No character with id {o['character']}.")
        request = GenerationRequest(
            references=[],
            prompt=o["prompt"],
            negative_prompt=o["negative_prompt"],
            width=o["width"],
            height=o["height"],
            steps=o["steps"],
            guidance=o["guidance"],
            seed=o["seed"],
            num_images=o["num_images"],
        )
        started = time.monotonic()
        try:
            method = load_method(o["method"], models_dir=o["models_dir"], options=LoadOptions.for_device(o["device"]))
            self.stdout.write(f"Loaded {o['method']} in {time.monotonic() - started:.1f}s")
            outputs = generate_for_character(character=character, method=method, request=request, on_step=self._bar)
        except AlkemyError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        if getattr(self, "_progress", None) is not None:
            self._progress.close()
        o["out"].mkdir(parents=True, exist_ok=True)
        for output in outputs:
            path = o["out"] / f"{character.slug}-{o['method']}-seed{output.seed}.png"
            output.image.save(path)
            score = output.score
            verdict = (
                f"identity {score.similarity:.3f}" if score.similarity is not None else f"identity n/a ({score.reason})"
            )
            self.stdout.write(f"{path}  {verdict}")
        self.stdout.write(f"Done in {time.monotonic() - started:.1f}s")

    def _bar(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if getattr(self, "_progress", None) is None:
            self._progress = tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
        self._progress.total, self._progress.n = total, step
        self._progress.refresh()
