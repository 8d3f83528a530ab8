from django.core.management.base import BaseCommand, CommandError

from alkemy.errors import AlkemyError
from alkemy.tenancy.models import Role
from alkemy.tenancy.services import api_key_create, tenant_create


class Command(BaseCommand):
    help = "Create a tenant; with --api-key also create a key and print it alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("slug", help="URL-safe identifier, e.g. 'northlight-studio'")
        parser.add_argument("--name", default="", help="Display name (defaults to the slug)")
        parser.add_argument("--api-key", action="store_true", help="Also create an API key and print it")
        parser.add_argument("--role", default=Role.MEMBER, choices=Role.values, help="Role of the API key")

    def handle(self, *args, slug, name, api_key, role, **options):
        try:
            tenant = tenant_create(slug=slug, name=name)
        except AlkemyError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(f"Created tenant {tenant.slug} (id {tenant.pk}).")
        if api_key:
            key, plaintext = api_key_create(tenant=tenant, name="created by create_tenant", role=role)
            self.stdout.write(f"API key {key.name!r} (role {key.role}), shown once:")
            self.stdout.write(plaintext)
