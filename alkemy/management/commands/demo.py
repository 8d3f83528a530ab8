"""`make demo`: database, migrations, a demo tenant with an API key and an admin user, sample
characters and a search by photo, then serve."""

import numpy as np
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

    def handle(self, *args, addr, no_serve, **options):
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
            call_command("runserver", addr, use_reloader=False)

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
