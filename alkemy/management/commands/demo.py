"""`make demo`: database, migrations, a demo tenant with an API key and an admin user, sample
characters and a search by photo; then the web server and the worker clusters (CPU, GPU, webhooks), and one
generation with tiny models through the API."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand

from alkemy.tenancy.models import ApiKey, Role, Tenant
from alkemy.tenancy.services import api_key_create, api_key_revoke, membership_set, tenant_create

DEMO_TENANT = "demo"
DEMO_ADMIN = "admin"
DEMO_PASSWORD = "alkemy-demo"


class Command(BaseCommand):
    help = "Prepare a demo tenant, API key and admin user, then serve at http://127.0.0.1:8000."

    def add_arguments(self, parser):
        parser.add_argument("--addr", default="127.0.0.1:8000")
        parser.add_argument("--no-serve", action="store_true", help="Set everything up, print it, and exit.")
        parser.add_argument(
            "--no-generation", action="store_true", help="Serve without building tiny models or the sample generation."
        )

    def handle(self, *args, addr, no_serve, no_generation=False, **options):
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)

        tenant = Tenant.objects.filter(slug=DEMO_TENANT).first() or tenant_create(slug=DEMO_TENANT, name="Demo Studio")
        for old in ApiKey.objects.unscoped().filter(tenant=tenant, name="demo", revoked_at__isnull=True):
            api_key_revoke(api_key=old)
        _, plaintext = api_key_create(tenant=tenant, name="demo", role=Role.OWNER)

        User = get_user_model()
        admin = User.objects.filter(username=DEMO_ADMIN).first()
        if admin is None:
            admin = User.objects.create_superuser(DEMO_ADMIN, "admin@example.com", DEMO_PASSWORD)
        membership_set(tenant=tenant, user=admin, role=Role.OWNER)

        self.enrol_samples(tenant)

        base = f"http://{addr}"
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "Alkemy Cast demo",
                    f"  API:        {base}/api/v1/   (docs: {base}/api/v1/docs)",
                    f"  Admin:      {base}/admin/    user '{DEMO_ADMIN}', password '{DEMO_PASSWORD}'",
                    f"  Tenant:     {tenant.slug}",
                    f"  API key:    {plaintext}",
                    f"  Try:        curl -H 'Authorization: Api-Key {plaintext}' {base}/api/v1/characters",
                    "",
                ]
            )
        )
        if not no_serve:
            self.serve(addr, plaintext, generate=not no_generation)

    def ensure_models(self) -> None:
        """Use $ALKEMY_MODELS_DIR when PuLID-FLUX (the demo's method) is ready there, else tiny models."""
        from generation.methods import METHODS
        from generation.model_registry import missing_files

        if not missing_files(settings.ALKEMY_MODELS_DIR, "pulid_flux"):
            self.stdout.write(f"Model weights: {settings.ALKEMY_MODELS_DIR}")
            return
        tiny = Path(settings.ALKEMY_DATA_DIR) / "tiny-models"
        if any(missing_files(tiny, method) for method in METHODS):
            self.stdout.write(f"No real weights in {settings.ALKEMY_MODELS_DIR}; building tiny test models in {tiny}")
            with open(os.devnull, "w") as quiet:
                call_command("build_test_models", str(tiny), stdout=quiet)
        else:
            self.stdout.write(f"No real weights in {settings.ALKEMY_MODELS_DIR}; using the tiny test models in {tiny}")
        os.environ["ALKEMY_MODELS_DIR"] = str(tiny)  # inherited by the worker processes
        settings.ALKEMY_MODELS_DIR = tiny

    def serve(self, addr: str, api_key: str, generate: bool = True) -> None:
        """Web server + default and gpu clusters as child processes; one generation; then wait.

        Each child runs in its own process group, which this process stops: SIGINT once (a Ctrl-C in the
        terminal reaches only this process), then SIGKILL for the whole group of one that does not stop in
        time, so no cluster's worker processes outlive the demo (they would keep the database running)."""
        if generate:
            self.ensure_models()
        # SIGTERM ends the demo like Ctrl-C: children stopped, the embedded database shut down cleanly. Ctrl-C
        # raises KeyboardInterrupt even when whoever started us ignored SIGINT (an ignored signal is inherited).
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)), signal.signal(
            signal.SIGINT, signal.default_int_handler
        )
        manage = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py")]

        # The children's output goes to files, so the demo's own lines read as one story.
        log_dir = Path(settings.ALKEMY_DATA_DIR) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)

        def start(log_name: str, *args: str, **env: str) -> subprocess.Popen:
            with open(log_dir / f"{log_name}.log", "ab") as log:  # the child keeps its own descriptor
                return subprocess.Popen(
                    [*manage, *args], env={**os.environ, **env}, start_new_session=True,
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip

        children = {}
        try:
            children["web"] = start("web", "runserver", addr, "--noreload")
            for name, cluster in (("cpu", "default"), ("gpu", "gpu"), ("webhooks", "webhooks")):
                children[f"{name} cluster"] = start(f"{name}-cluster", "qcluster", Q_CLUSTER_NAME=cluster)
            self.stdout.write(f"\nLogs of the web server and the worker clusters: {log_dir}/{{web,cpu-cluster,"
                              "gpu-cluster,webhooks-cluster}.log")  # fmt: skip
            if generate:
                self.demo_generation(f"http://{addr}", api_key)
            self.stdout.write(f"\nServing at http://{addr}/ and all worker clusters; Ctrl-C stops everything.")
            self.stdout.flush()
            children["web"].wait()
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
            for child in children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 15
            for child in children.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(max(deadline - time.monotonic(), 0.1))
                with contextlib.suppress(ProcessLookupError):  # the child and whatever it left in its group
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            # SIGKILL is not instant: a worker still dying when this process exits is counted as a live user of
            # the embedded database, which then stays up after everyone has gone.
            _wait_until_gone({child.pid for child in children.values()}, timeout=10)
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])

    def demo_generation(self, base: str, api_key: str) -> None:
        def call(method: str, path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(
                base + path,
                method=method,
                data=json.dumps(body).encode() if body is not None else None,
                headers={"Authorization": f"Api-Key {api_key}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        deadline = time.monotonic() + 60
        while True:
            try:
                call("GET", "/api/v1/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        character = call("GET", "/api/v1/characters?search=Eileen")["results"][0]
        job = call(
            "POST",
            "/api/v1/generations",
            {"character": character["id"], "method": "pulid_flux", "prompt": "portrait on the moon, film still",
             "width": 256, "height": 256, "steps": 8, "seed": 42},
        )  # fmt: skip
        self.stdout.write(f"\nGeneration #{job['id']} ({job['method']}) of {character['name']} submitted via the API:")
        last = None
        deadline = time.monotonic() + 600
        while job["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = call("GET", f"/api/v1/generations/{job['id']}")
            line = (
                f"  {job['status']:<9} {job['progress'] * 100:5.1f}%  step {job['current_step']}/{job['total_steps']}"
            )
            if line != last:
                self.stdout.write(line)
                last = line
        if job["status"] != "succeeded":
            self.stdout.write(f"  ended {job['status']}: {job['error']}")
            return
        from generation.models import GeneratedImage

        for output in job["outputs"]:
            stored = GeneratedImage.objects.unscoped().get(pk=output["id"]).file.path
            score = output["identity_similarity"]
            identity = f"{score:.3f}" if score is not None else f"n/a ({output['identity_reason']})"
            self.stdout.write(
                f"  output: {stored}\n          {output['url']}  seed {output['seed']}  identity {identity}"
            )
        self.stdout.write(f"  queue wait {job['queue_wait_seconds']}s, run {job['run_seconds']}s on {job['device']}")

    def enrol_samples(self, tenant) -> None:
        """Sample characters from photos inside our dependencies, then one search by photo."""
        from PIL import Image, ImageEnhance

        from alkemy.tenancy.scoping import tenant_scope
        from characters.models import Character
        from characters.samples import as_upload, sample_people
        from characters.services import character_create, faces_search, reference_add

        people = sample_people()
        self.stdout.write(f"\nSample characters ({len(people)}, faces from photos shipped in dependencies):")
        with tenant_scope(tenant):
            for name, pixels in people.items():
                character = Character.objects.filter(tenant=tenant, name=name).first()
                if character is None:
                    character = character_create(tenant=tenant, name=name, tags=["sample"])
                if not character.references.exists():
                    reference_add(character=character, upload=as_upload(pixels, f"{character.slug}.png"))
                self.stdout.write(f"  - {name}")

            # A new photo of Eileen Collins: mirrored, cropped and brighter than her reference.
            photo = Image.fromarray(people["Eileen Collins"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            photo = ImageEnhance.Brightness(photo.crop((40, 20, 500, 480))).enhance(1.3)
            found = faces_search(tenant=tenant, upload=as_upload(np.asarray(photo), "query.png"), limit=3)
        self.stdout.write(f"\nSearch by photo (a new photo of Eileen Collins, embedder {found.embedder.name}):")
        for rank, match in enumerate(found.results, start=1):
            verdict = "same person" if match.is_match else "different person"
            self.stdout.write(f"  {rank}. {match.character.name:<24} similarity {match.similarity:.3f}  ({verdict})")


def _wait_until_gone(groups: set[int], timeout: float) -> None:
    """Wait until no process of these process groups is alive (a zombie counts as gone: nothing may reap it)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for proc in psutil.process_iter(["status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) in groups:
                    alive.append(proc)
        if not alive:
            return
        time.sleep(0.05)
