"""`make demo`: database, migrations, a demo tenant with an API key and an admin user, then serve."""

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
