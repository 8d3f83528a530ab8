from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from generation.model_fetch import SOURCES, HubSource, fetch, hub_endpoint, hub_token, plan
from generation.model_registry import METHOD_COMPONENTS

LOCAL_METHODS = [method for method, components in METHOD_COMPONENTS.items() if components]


def key_values(pairs: list[str], option: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SOURCES or not value:
            raise CommandError(f"{option} takes KEY=VALUE with KEY one of {', '.join(SOURCES)}; got {pair!r}")
        result[key] = value
    return result


class Command(BaseCommand):
    help = (
        "Download the weights the model registry lists into the models dir (Hugging Face Hub files through "
        "huggingface_hub, resumable, checksums verified; HF_TOKEN for gated repositories such as FLUX.1-dev; "
        "HF_ENDPOINT for a mirror), then run check_models."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--method", action="append", choices=LOCAL_METHODS, default=None,
            help="fetch what this method needs (repeatable); default: every method with local weights",
        )  # fmt: skip
        parser.add_argument("--models-dir", type=Path, default=None, help="default: $ALKEMY_MODELS_DIR")
        parser.add_argument(
            "--url", action="append", default=[], metavar="KEY=URL",
            help="another URL for a source that is not on the Hub (face_parsing, antelopev2), e.g. a mirror",
        )  # fmt: skip
        parser.add_argument(
            "--sha256", action="append", default=[], metavar="KEY=HEX",
            help="the SHA-256 a URL source must have (the Hub's own files are always verified)",
        )  # fmt: skip
        parser.add_argument(
            "--list", action="store_true", dest="list_only", help="print the files it would fetch, download nothing"
        )

    def handle(self, *args, method, models_dir, url, sha256, list_only, **options):
        models_dir = Path(models_dir or settings.ALKEMY_MODELS_DIR)
        keys = plan(method or LOCAL_METHODS)
        urls, sha256s = key_values(url, "--url"), key_values(sha256, "--sha256")
        if list_only:
            for key in keys:
                source = SOURCES[key]
                if isinstance(source, HubSource):
                    for name in source.files:
                        self.stdout.write(f"{key}\t{source.repo_id}@{source.revision}\t{name}")
                else:
                    self.stdout.write(f"{key}\t{urls.get(key, source.url)}")
            return
        self.stdout.write(f"Models directory: {models_dir}")
        self.stdout.write(f"Hub: {hub_endpoint()} ({'with' if hub_token() else 'without'} HF_TOKEN)")
        models_dir.mkdir(parents=True, exist_ok=True)
        outcomes = fetch(models_dir=models_dir, keys=keys, urls=urls, sha256s=sha256s, log=self.stdout.write)
        downloaded = sum(len(o.downloaded) for o in outcomes)
        current = sum(len(o.up_to_date) for o in outcomes)
        self.stdout.write(f"\nDownloaded {downloaded} file(s), {current} already up to date.\n")
        call_command("check_models", models_dir=models_dir, stdout=self.stdout._out, stderr=self.stderr._out)
        failed = [o for o in outcomes if o.error]
        if failed:
            raise CommandError(
                f"{len(failed)} component(s) could not be fetched:\n"
                + "\n".join(f"  {o.key}: {o.error}" for o in failed)
                + "\nRerun fetch_models after fixing this: finished files are kept, partial ones resume."
            )
