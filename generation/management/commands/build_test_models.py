from pathlib import Path

from django.core.management.base import BaseCommand

from generation.tiny.build import build_test_models


class Command(BaseCommand):
    help = (
        "Write tiny random-initialised models in the real on-disk layout of every method into DIR "
        "(use DIR as ALKEMY_MODELS_DIR for tests and the demo)."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument(
            "--embedder",
            default=None,
            help="Face embedder the tiny ID encoders are built for, declared in embedding_space.json beside them "
            "(default: the active face embedder)",
        )
        parser.add_argument(
            "--embedder-dims",
            type=int,
            default=None,
            help="Face embedding size the ID encoders take (default: the active face embedder's)",
        )

    def handle(self, *args, directory: Path, embedder, embedder_dims, **options):
        written = build_test_models(directory, embedder=embedder, embedder_dims=embedder_dims, progress=True)
        for path in written:
            self.stdout.write(f"  {path}")
        self.stdout.write(f"Tiny models written to {directory.resolve()}")
