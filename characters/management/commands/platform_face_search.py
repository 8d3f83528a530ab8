"""`manage.py platform_face_search`: superuser tool, the nearest characters of EVERY tenant to a face.

For operators only (e.g. a duplicate check across studios); nothing in the tenant API reaches it.
"""

from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand, CommandError

from alkemy.errors import AlkemyError
from alkemy.tenancy.scoping import all_tenants
from characters.faces import embedder_infos, get_embedder, resolve_embedder_name
from characters.models import Character, CharacterIdentity
from characters.photos import load_photo
from characters.quality import rank_faces
from characters.search import platform_nearest_characters


class Command(BaseCommand):
    help = (
        "Platform-wide face search across all tenants (operators only): give a photo (--image) or a character "
        "(--character, its identity). Prints tenant, character and similarity, best first."
    )

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--image", type=Path, help="a photo; its main face is searched")
        source.add_argument("--character", type=int, help="a character id; its identity is searched")
        parser.add_argument("--limit", type=int, default=10)
        parser.add_argument("--min-similarity", type=float)

    def handle(self, *args, image: Path | None, character: int | None, limit: int, min_similarity, **options):
        if not 1 <= limit <= 100:
            raise CommandError("--limit must be 1-100.")
        if image is not None:
            try:
                photo = load_photo(image.read_bytes())
            except (OSError, AlkemyError) as exc:
                raise CommandError(f"Cannot use {image}: {exc}") from None
            embedder = get_embedder()
            faces = embedder.analyze(photo.pixels)
            if not faces:
                raise CommandError("No face was found in the photo.")
            face, _, _ = rank_faces(faces)
            name, vector = embedder.info.name, face.embedding
        else:
            name = resolve_embedder_name()
            with all_tenants():
                identity = CharacterIdentity.objects.filter(character_id=character, embedder=name).first()
            if identity is None:
                raise CommandError(f"Character {character} has no '{name}' identity.")
            vector = np.asarray(identity.embedding)
        found = platform_nearest_characters(embedder=name, vector=vector, limit=limit, min_similarity=min_similarity)
        with all_tenants():
            characters = Character.objects.select_related("tenant").in_bulk([n.character_id for n in found])
        info = embedder_infos()[name]
        for n in found:
            c = characters.get(n.character_id)
            if c is None or n.character_id == character:
                continue
            match = " match" if n.similarity >= info.match_threshold else ""
            self.stdout.write(
                f"{n.similarity:.4f}{match}\ttenant {c.tenant.slug} ({c.tenant_id})\tcharacter {c.name} ({c.pk})"
                f"\treference {n.reference_id}"
            )
