"""`manage.py reembed_references`: analyse characters' stored reference photos again with another face embedder."""

from django.core.management.base import BaseCommand, CommandError

from alkemy.tenancy.scoping import all_tenants
from characters.faces import EmbedderUnavailable, embedder_infos
from characters.models import Character
from characters.services import references_reembed


class Command(BaseCommand):
    help = (
        "Embed every reference photo of the given characters with EMBEDDER (adding to the embeddings they have) "
        "and recompute their identity for it. Use it when a generation method's weights need another embedding "
        "space (PuLID and InstantID: arcface_antelopev2), or to fill raw norms of older embeddings. Idempotent."
    )

    def add_arguments(self, parser):
        parser.add_argument("--character", type=int, action="append", required=True, help="Character id (repeatable)")
        parser.add_argument("--embedder", required=True, help=f"one of: {', '.join(embedder_infos())}")

    def handle(self, *args, character: list[int], embedder: str, **options):
        if embedder not in embedder_infos():
            raise CommandError(f"Unknown face embedder '{embedder}'; known: {', '.join(embedder_infos())}.")
        with all_tenants():
            characters = Character.objects.filter(pk__in=character).order_by("pk")
            found = {c.pk: c for c in characters}
        unknown = sorted(set(character) - set(found))
        if unknown:
            raise CommandError(f"No character with id {', '.join(map(str, unknown))}.")
        failures = 0
        for pk in dict.fromkeys(character):
            subject = found[pk]
            try:
                outcomes = references_reembed(character=subject, embedder=embedder)
            except EmbedderUnavailable as exc:
                raise CommandError(str(exc)) from None
            embedded = sum(o.outcome == "embedded" for o in outcomes)
            self.stdout.write(f"Character {pk} ({subject.name}): {embedded} of {len(outcomes)} reference(s) embedded")
            for outcome in outcomes:
                if outcome.outcome != "embedded":
                    self.stdout.write(f"  reference {outcome.reference.pk}: no face on its stored face box; skipped")
            if not embedded:
                failures += 1
        if failures:
            raise CommandError(f"{failures} character(s) got no '{embedder}' embedding at all.")
