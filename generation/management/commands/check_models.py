from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand
from django.test.utils import override_settings

from characters.faces import AUTO_ORDER, embedder_missing, embedder_not_for_auto, resolve_embedder_name
from generation.methods import METHODS
from generation.methods.base import InvalidWeights
from generation.model_registry import (
    COMPONENTS,
    ID_ENCODER_COMPONENTS,
    METHOD_COMPONENTS,
    embedding_space,
    missing_files,
)


class Command(BaseCommand):
    help = (
        "Say, per generation method and face embedder, whether its weights are present (nothing is downloaded), "
        "and which face embedder's embeddings PuLID's and InstantID's weights take."
    )

    def add_arguments(self, parser):
        parser.add_argument("--models-dir", type=Path, default=None, help="default: $ALKEMY_MODELS_DIR")

    def handle(self, *args, models_dir, **options):
        models_dir = Path(models_dir or settings.ALKEMY_MODELS_DIR)
        self.stdout.write(f"Models directory: {models_dir}")
        self.stdout.write("\nFace embedders:")
        with override_settings(ALKEMY_MODELS_DIR=models_dir):  # the insightface packs of that folder
            for name in AUTO_ORDER:
                problem = embedder_missing(name)
                self.stdout.write(f"  {name:<20} {'ready' if problem is None else 'missing: ' + problem}")
                reason = embedder_not_for_auto(name)
                if problem is None and reason:
                    self.stdout.write(f"  {'':<20} not picked by auto: {reason}")
            active = resolve_embedder_name()
        self.stdout.write(f"  active: {active}")
        self.stdout.write("\nGeneration methods:")
        for method in METHODS:
            missing = missing_files(models_dir, method)
            if not METHOD_COMPONENTS[method]:
                self.stdout.write(f"  {method:<16} remote API, no weights (needs a tenant key or GEMINI_API_KEY)")
                continue
            if not missing:
                self.stdout.write(f"  {method:<16} ready")
            if method in ID_ENCODER_COMPONENTS:
                self._embedding_space(models_dir, method, active)
            if not missing:
                continue
            self.stdout.write(f"  {method:<16} missing {len(missing)} file(s):")
            for path in missing:
                component = next(
                    COMPONENTS[k]
                    for k in METHOD_COMPONENTS[method]
                    if str(path).startswith(str(models_dir / COMPONENTS[k].path))
                )
                self.stdout.write(f"      {path}  ← {component.source}")

    def _embedding_space(self, models_dir: Path, method: str, active: str) -> None:
        """Which embeddings the method's weights take, and what to do when the active embedder differs."""
        try:
            space = embedding_space(models_dir, method)
        except InvalidWeights as exc:
            self.stdout.write(f"      embedding space: unreadable: {exc.message}")
            return
        self.stdout.write(f"      needs face embeddings from: {space.embedder} (declared by {space.declared_by})")
        if space.embedder != active:
            self.stdout.write(
                f"      note: the active face embedder is {active}; characters enrolled with it are refused "
                f"(embedding_space_mismatch) until re-embedded: manage.py reembed_references --character ID "
                f"--embedder {space.embedder}"
            )
