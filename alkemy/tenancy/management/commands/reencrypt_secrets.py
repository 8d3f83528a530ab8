"""Re-encrypt every stored secret with the newest encryption key (step 2 of a key rotation, alkemy/crypto.py)."""

from django.core.management.base import BaseCommand, CommandError

from alkemy.crypto import SecretUnreadable, reencrypt
from alkemy.tenancy.models import Tenant


class Command(BaseCommand):
    help = (
        "Re-encrypt the tenants' stored Gemini keys with the first key of ALKEMY_ENCRYPTION_KEYS. Run it after "
        "putting a new key in front of the list; then the old keys can be removed. Keys that no configured "
        "key can read are listed and left alone (their owners must enter them again); the command then exits 1."
    )

    def handle(self, *args, **options):
        rotated, unreadable = 0, []
        for tenant_id, slug, token in (
            Tenant.objects.exclude(gemini_api_key_encrypted="")
            .order_by("slug")
            .values_list("pk", "slug", "gemini_api_key_encrypted")
        ):
            try:
                new_token = reencrypt(token)
            except SecretUnreadable:
                unreadable.append(slug)
                continue
            # Conditional on the old value: a key an owner set meanwhile is already under the newest key.
            rotated += Tenant.objects.filter(pk=tenant_id, gemini_api_key_encrypted=token).update(
                gemini_api_key_encrypted=new_token
            )
        self.stdout.write(f"Gemini keys: {rotated} re-encrypted with the newest key, {len(unreadable)} unreadable.")
        if unreadable:
            raise CommandError(
                "Unreadable with every configured key (an owner or admin must enter them again): "
                + ", ".join(unreadable)
            )
