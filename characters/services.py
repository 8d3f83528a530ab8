"""What happens to characters: create, update, delete. Views and admin call these."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.utils.text import slugify
from PIL import Image

from alkemy.errors import AlkemyError, Conflict, Unprocessable
from alkemy.files import delete_files_on_commit
from alkemy.metrics import ENROLMENT_SECONDS
from alkemy.tenancy.models import Tenant
from characters.analysis import AnalysedPhoto, photo_analyse_bytes
from characters.faces import DetectedFace, EmbedderInfo, embedder_infos, get_embedder, resolve_embedder_name
from characters.models import Character, CharacterIdentity, FaceEmbedding, ReferenceImage, reference_upload_to
from characters.photos import load_photo, oriented, read_upload
from characters.quality import rank_faces
from characters.search import nearest_characters, similar_identities

MAX_TAGS = 20
MAX_TAG_LENGTH = 50


def normalise_tags(tags: Iterable[str]) -> list[str]:
    """Lowercase, trimmed, unique, in first-seen order."""
    result: list[str] = []
    for raw in tags:
        tag = " ".join(str(raw).split()).lower()
        if not tag:
            continue
        if len(tag) > MAX_TAG_LENGTH:
            raise AlkemyError(
                f"Tag '{tag[:20]}…' is longer than {MAX_TAG_LENGTH} characters.", code="invalid_tag", field="tags"
            )
        if tag not in result:
            result.append(tag)
    if len(result) > MAX_TAGS:
        raise AlkemyError(f"A character has at most {MAX_TAGS} tags.", code="too_many_tags", field="tags")
    return result


def _unique_slug(*, tenant: Tenant, name: str, exclude_pk: int | None = None) -> str:
    """A free slug for `name` in the tenant: `name`, else `name-2`, `name-3`... found with one query.

    Names without Latin letters ("山田 太郎") have no ASCII slug; they get `character-` and a short random
    suffix, so they neither all share one base nor queue up behind it. (Unicode slugs would need the
    model's SlugField to allow them, or admin could not save such a character.)
    """
    base = slugify(name)[:90] or f"character-{secrets.token_hex(4)}"
    # slugify leaves only [a-z0-9_-], so the base needs no escaping in the pattern
    taken = set(
        Character.objects.unscoped()
        .filter(tenant=tenant, slug__regex=rf"^{base}(-[0-9]+)?$")
        .exclude(pk=exclude_pk)
        .values_list("slug", flat=True)
    )
    slug, n = base, 2
    while slug in taken:
        slug, n = f"{base}-{n}", n + 1
    return slug


def _save(character: Character) -> Character:
    try:
        with transaction.atomic():
            character.save()
    except IntegrityError:
        raise Conflict(
            f"Another character of this tenant already has the slug '{character.slug}'.",
            code="slug_taken",
            field="slug",
        ) from None
    return character


def character_create(
    *,
    tenant: Tenant,
    name: str,
    slug: str = "",
    description: str = "",
    tags: Iterable[str] = (),
    created_by=None,
    created_by_api_key=None,
) -> Character:
    name = name.strip()
    if not name:
        raise AlkemyError("A character needs a name.", code="invalid_name", field="name")
    character = Character(
        tenant=tenant,
        name=name,
        slug=slug or _unique_slug(tenant=tenant, name=name),
        description=description,
        tags=normalise_tags(tags),
        created_by=created_by,
        created_by_api_key=created_by_api_key,
    )
    for attempt in range(5):
        try:
            return _save(character)
        except Conflict:  # a concurrent namesake took the derived slug first: derive the next free one
            if slug or attempt == 4:
                raise
            character.slug = _unique_slug(tenant=tenant, name=name)


def character_update(*, character: Character, **changes) -> Character:
    """Apply `changes` (name, slug, description, tags, is_archived); unknown fields are a bug."""
    allowed = {"name", "slug", "description", "tags", "is_archived"}
    unknown = set(changes) - allowed
    if unknown:
        raise TypeError(f"character_update got unknown fields {sorted(unknown)}")
    if "name" in changes:
        changes["name"] = changes["name"].strip()
        if not changes["name"]:
            raise AlkemyError("A character needs a name.", code="invalid_name", field="name")
    if "tags" in changes:
        changes["tags"] = normalise_tags(changes["tags"])
    if "slug" in changes and not (changes["slug"] or "").strip():
        # an empty slug means "derive it from the name", as at creation
        name = changes.get("name", character.name)
        changes["slug"] = _unique_slug(tenant=character.tenant, name=name, exclude_pk=character.pk)
    for field, value in changes.items():
        setattr(character, field, value)
    return _save(character)


def character_delete(*, character: Character) -> None:
    """Delete the character with its references, generations, LoRAs and their files (after commit)."""
    from generation.models import GeneratedImage
    from training.models import LoraArtifact, TrainingJob

    with transaction.atomic():
        # Lock first, then collect: a job finishing meanwhile (which holds the character FOR KEY
        # SHARE while it stores outputs) either commits before us, and its files are collected, or
        # finds the character gone and removes its own.
        if not Character.objects.unscoped().select_for_update().filter(pk=character.pk).exists():
            return
        trainings = TrainingJob.objects.unscoped().filter(character=character)
        file_names = [
            *ReferenceImage.objects.unscoped().filter(character=character).values_list("file", flat=True),
            *GeneratedImage.objects.unscoped().filter(job__character=character).values_list("file", flat=True),
            *LoraArtifact.objects.unscoped().filter(character=character).values_list("file", flat=True),
            *trainings.values_list("validation_image", flat=True),
            *trainings.values_list("checkpoint_file", flat=True),  # a plain path: no row names it once deleted
        ]
        character.delete()
        delete_files_on_commit(file_names)


# --- reference photos and identities -------------------------------------------------------


@dataclass
class SimilarCharacter:
    character: Character
    similarity: float
    reference_id: int | None = None
    is_match: bool = False


@dataclass
class ReferenceAdded:
    reference: ReferenceImage
    similar_characters: list[SimilarCharacter]


def photo_analyse(*, upload, min_face_px: int | None = None) -> AnalysedPhoto:
    """Read, validate and face-analyse an uploaded photo; Unprocessable on any problem."""
    return photo_analyse_bytes(data=read_upload(upload), min_face_px=min_face_px)


@ENROLMENT_SECONDS.time()
def reference_add(*, character: Character, upload, created_by=None) -> ReferenceAdded:
    """Store a reference photo of `character`: validate, detect, embed, update the identity.

    Leaves no row and no file behind when anything fails. Possible duplicates among the
    tenant's other characters are reported, not refused.
    """
    max_references = settings.ALKEMY_MAX_REFERENCES
    if ReferenceImage.objects.unscoped().filter(character=character).count() >= max_references:
        raise _too_many_references(max_references)
    return reference_store(character=character, analysed=photo_analyse(upload=upload), created_by=created_by)


def reference_store(*, character: Character, analysed: AnalysedPhoto, created_by=None) -> ReferenceAdded:
    """The second half of `reference_add`: store an analysed photo as a reference of `character`, its
    embedding, the recomputed identity; report possible duplicates. Bulk imports analyse in worker
    processes and call this in the parent. Leaves no row and no file behind when anything fails."""
    max_references = settings.ALKEMY_MAX_REFERENCES
    photo = analysed.photo

    stored_name = None
    try:
        with transaction.atomic():
            # Serialise additions per character: the count and duplicate checks must hold at commit.
            Character.objects.unscoped().select_for_update().filter(pk=character.pk).first()
            references = ReferenceImage.objects.unscoped().filter(character=character)
            if references.count() >= max_references:
                raise _too_many_references(max_references)
            if references.filter(sha256=photo.sha256).exists():
                raise Conflict(
                    "This photo is already a reference of the character.", code="duplicate_reference", field="image"
                )
            reference = ReferenceImage(
                tenant_id=character.tenant_id,
                character=character,
                sha256=photo.sha256,
                image_format=photo.image_format,
                file_size=len(photo.data),
                width=photo.width,
                height=photo.height,
                embedder=analysed.embedder.name,
                face_box=[round(v, 1) for v in analysed.subject.box],
                landmarks=[[round(float(x), 1), round(float(y), 1)] for x, y in analysed.subject.keypoints],
                det_score=analysed.subject.score,
                quality=analysed.quality,
                warnings=analysed.warnings,
                other_faces=[[round(v, 1) for v in face.box] for face in analysed.others],
                created_by=created_by if getattr(created_by, "pk", None) else None,
            )
            stored_name = default_storage.save(reference_upload_to(reference, ""), ContentFile(photo.data))
            reference.file.name = stored_name
            reference.save()
            FaceEmbedding.objects.unscoped().create(
                tenant_id=character.tenant_id,
                character=character,
                reference=reference,
                embedder=analysed.embedder.name,
                dims=analysed.embedder.dims,
                embedding=analysed.subject.embedding,
                raw_norm=analysed.subject.raw_norm,
            )
            identity = identity_recompute(character=character, embedder=analysed.embedder.name)
    except BaseException:
        if stored_name:
            default_storage.delete(stored_name)
        raise

    similar = identity_duplicates(character=character, identity=identity)
    return ReferenceAdded(reference=reference, similar_characters=similar)


@dataclass
class ReferenceReembedded:
    reference: ReferenceImage
    #: "embedded" (stored or refreshed) or "no_matching_face" (the embedder found no face on the stored box)
    outcome: str


def references_reembed(*, character: Character, embedder: str) -> list[ReferenceReembedded]:
    """Analyse the character's stored reference photos again with `embedder` and store those embeddings.

    For moving a character into the embedding space a generation method needs (PuLID and InstantID:
    `arcface_antelopev2`) or filling raw norms of older rows. Each photo's subject is the face
    the new embedder finds on the stored face box (the reference's geometry stays as enrolled); a
    photo where it finds none there is reported and keeps whatever embeddings it had. Embeddings are
    stored per (reference, embedder), so running it again changes nothing; the identity for
    `embedder` is recomputed. EmbedderUnavailable when `embedder` cannot load.
    """
    analyser = get_embedder(embedder)
    references = list(ReferenceImage.objects.unscoped().filter(character=character).order_by("pk"))
    found: list[tuple[ReferenceImage, DetectedFace | None]] = []
    for reference in references:  # the slow part, outside any transaction
        with reference.file.open("rb") as handle:
            pixels = np.asarray(oriented(Image.open(handle)).convert("RGB"))
        found.append((reference, _face_on_box(analyser.analyze(pixels), reference.face_box)))

    outcomes = []
    with transaction.atomic():
        Character.objects.unscoped().select_for_update().filter(pk=character.pk).first()
        alive = set(ReferenceImage.objects.unscoped().filter(character=character).values_list("pk", flat=True))
        for reference, face in found:
            if reference.pk not in alive:  # deleted meanwhile
                continue
            if face is None:
                outcomes.append(ReferenceReembedded(reference, "no_matching_face"))
                continue
            FaceEmbedding.objects.unscoped().update_or_create(
                reference=reference,
                embedder=analyser.info.name,
                defaults={
                    "tenant_id": character.tenant_id,
                    "character": character,
                    "dims": analyser.info.dims,
                    "embedding": face.embedding,
                    "raw_norm": face.raw_norm,
                },
            )
            outcomes.append(ReferenceReembedded(reference, "embedded"))
        identity_recompute(character=character, embedder=analyser.info.name)
    return outcomes


def _face_on_box(faces: list[DetectedFace], box) -> DetectedFace | None:
    """The re-analysed face that is the reference's subject: among the faces whose box contains the centre of
    the stored `box`, the one overlapping it most (detectors draw boxes of different tightness, so the
    centre, not a fixed overlap, says "the same face"); None when no face covers it."""
    bx1, by1, bx2, by2 = box
    centre_x, centre_y = (bx1 + bx2) / 2, (by1 + by2) / 2

    def overlap(face: DetectedFace) -> float:
        ax1, ay1, ax2, ay2 = face.box
        inter = max(min(ax2, bx2) - max(ax1, bx1), 0) * max(min(ay2, by2) - max(ay1, by1), 0)
        return inter / (face.area + (bx2 - bx1) * (by2 - by1) - inter)

    covering = [f for f in faces if f.box[0] <= centre_x <= f.box[2] and f.box[1] <= centre_y <= f.box[3]]
    return max(covering, key=overlap, default=None)


def _too_many_references(limit: int) -> Unprocessable:
    return Unprocessable(
        f"A character holds at most {limit} reference photos; delete one first.",
        code="too_many_references",
        field="image",
        details={"max_references": limit},
    )


def reference_delete(*, reference: ReferenceImage) -> None:
    """Remove a reference and its embedding, recompute the identity, delete the file after commit."""
    file_name = reference.file.name
    character = reference.character
    embedders = set(FaceEmbedding.objects.unscoped().filter(reference=reference).values_list("embedder", flat=True))
    with transaction.atomic():
        Character.objects.unscoped().select_for_update().filter(pk=character.pk).first()
        reference.delete()
        for embedder in embedders | {reference.embedder}:
            identity_recompute(character=character, embedder=embedder)
        delete_files_on_commit([file_name])


def identity_recompute(*, character: Character, embedder: str) -> CharacterIdentity | None:
    """The character's identity for `embedder`: renormalised mean of its reference embeddings."""
    vectors = [
        np.asarray(v, dtype=np.float32)
        for v in FaceEmbedding.objects.unscoped()
        .filter(character=character, embedder=embedder)
        .values_list("embedding", flat=True)
    ]
    identities = CharacterIdentity.objects.unscoped().filter(character=character, embedder=embedder)
    if not vectors:
        identities.delete()
        return None
    mean = np.mean(np.stack(vectors), axis=0)
    mean /= np.linalg.norm(mean)
    identity, _ = CharacterIdentity.objects.unscoped().update_or_create(
        character=character,
        embedder=embedder,
        defaults={
            "tenant_id": character.tenant_id,
            "dims": len(mean),
            "embedding": mean,
            "reference_count": len(vectors),
        },
    )
    return identity


def identity_duplicates(*, character: Character, identity: CharacterIdentity | None) -> list[SimilarCharacter]:
    """Other characters of the tenant whose identity is above the embedder's duplicate threshold."""
    if identity is None:
        return []
    info = embedder_infos()[identity.embedder]
    neighbours = similar_identities(
        tenant_id=character.tenant_id,
        embedder=identity.embedder,
        vector=np.asarray(identity.embedding),
        exclude_character_id=character.pk,
        min_similarity=info.duplicate_threshold,
    )
    return _with_characters(neighbours, info)


def _with_characters(neighbours, info: EmbedderInfo) -> list[SimilarCharacter]:
    # with their reference counts in the same query: the serializer would count each one's (N+1)
    characters = (
        Character.objects.unscoped()
        .annotate(reference_count=Count("references"))
        .in_bulk([n.character_id for n in neighbours])
    )
    return [
        SimilarCharacter(
            character=characters[n.character_id],
            similarity=round(n.similarity, 4),
            reference_id=n.reference_id,
            is_match=n.similarity >= info.match_threshold,
        )
        for n in neighbours
        if n.character_id in characters
    ]


# --- search ---------------------------------------------------------------------------------


@dataclass
class FaceSearchResult:
    embedder: EmbedderInfo
    face: DetectedFace
    other_faces: list[DetectedFace]
    results: list[SimilarCharacter]


MAX_SEARCH_LIMIT = 100


def faces_search(*, tenant: Tenant, upload, limit: int = 10, min_similarity: float | None = None) -> FaceSearchResult:
    """The tenant's characters nearest to the largest face in the photo."""
    photo = load_photo(read_upload(upload))
    embedder = get_embedder()
    faces = embedder.analyze(photo.pixels)
    if not faces:
        raise Unprocessable("No face was found in the photo.", code="no_face", field="image")
    face, _, other_faces = rank_faces(faces)  # a search photo may show several people: take the main one
    neighbours = nearest_characters(
        tenant_id=tenant.pk,
        embedder=embedder.info.name,
        vector=face.embedding,
        limit=limit,
        min_similarity=min_similarity,
    )
    return FaceSearchResult(embedder.info, face, other_faces, _with_characters(neighbours, embedder.info))


def characters_similar(
    *, character: Character, limit: int = 10, min_similarity: float | None = None
) -> tuple[EmbedderInfo, list[SimilarCharacter]]:
    """Characters of the same tenant nearest to `character`'s identity (duplicate hunting)."""
    embedder = embedder_infos()[resolve_embedder_name()]
    identity = CharacterIdentity.objects.unscoped().filter(character=character, embedder=embedder.name).first()
    if identity is None:
        raise Unprocessable(
            f"The character has no reference photo analysed by the '{embedder.name}' embedder yet.",
            code="no_identity",
            field="character",
        )
    neighbours = nearest_characters(
        tenant_id=character.tenant_id,
        embedder=embedder.name,
        vector=np.asarray(identity.embedding),
        limit=limit,
        min_similarity=min_similarity,
        exclude_character_id=character.pk,
    )
    return embedder, _with_characters(neighbours, embedder)
