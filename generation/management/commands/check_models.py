from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from characters.faces import AUTO_ORDER, embedder_missing, resolve_embedder_name
from generation.methods import METHODS
from generation.model_registry import COMPONENTS, METHOD_COMPONENTS, PRODUCTION_EMBEDDER, missing_files


class Command(BaseCommand):
    help = "Say, per generation method and face embedder, whether its weights are present (nothing is downloaded)."

    def add_arguments(self, parser):
        parser.add_argument("--models-dir", type=Path, default=None, help="default: $ALKEMY_MODELS_DIR")

    def handle(self, *args, models_dir, **options):
        models_dir = Path(models_dir or settings.ALKEMY_MODELS_DIR)
        self.stdout.write(f"Models directory: {models_dir}")
        self.stdout.write("\nFace embedders:")
        for name in AUTO_ORDER:
            problem = embedder_missing(name)
            self.stdout.write(f"  {name:<20} {'ready' if problem is None else 'missing: ' + problem}")
        active = resolve_embedder_name()
        self.stdout.write(f"  active: {active}")
        if active != PRODUCTION_EMBEDDER:
            self.stdout.write(
                f"  note: PuLID and InstantID production weights expect {PRODUCTION_EMBEDDER} embeddings; "
                "the tiny test models are built for the active embedder."
            )
        self.stdout.write("\nGeneration methods:")
        for method in METHODS:
            missing = missing_files(models_dir, method)
            if not METHOD_COMPONENTS[method]:
                self.stdout.write(f"  {method:<16} remote API, no weights (needs a tenant key or GEMINI_API_KEY)")
                continue
            if not missing:
                self.stdout.write(f"  {method:<16} ready")
                continue
            self.stdout.write(f"  {method:<16} missing {len(missing)} file(s):")
            for path in missing:
                component = next(
                    COMPONENTS[k]
                    for k in METHOD_COMPONENTS[method]
                    if str(path).startswith(str(models_dir / COMPONENTS[k].path))
                )
                self.stdout.write(f"      {path}  ← {component.source}")
