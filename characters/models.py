"""The character registry: characters of a tenant, their reference photos and face identities."""

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from pgvector.django import VectorField

from alkemy.jobs import Job, JobStatus
from alkemy.tenancy.scoping import TenantOwnedModel


class Character(TenantOwnedModel):
    """A recurring person of a studio's productions, identified by the faces in its references."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="characters")
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100)
    description = models.TextField(blank=True)
    tags = ArrayField(models.CharField(max_length=50), default=list, blank=True)
    is_archived = models.BooleanField(default=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_api_key = models.ForeignKey(
        "tenancy.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]
        constraints = [models.UniqueConstraint(fields=["tenant", "slug"], name="character_unique_slug_per_tenant")]
        indexes = [models.Index(fields=["tenant", "is_archived", "name"], name="character_tenant_list_idx")]

    def __str__(self) -> str:
        return self.name


def reference_upload_to(instance: "ReferenceImage", filename: str) -> str:
    extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(instance.image_format, "bin")
    return f"tenants/{instance.tenant_id}/characters/{instance.character_id}/references/{instance.sha256}.{extension}"


class ReferenceImage(TenantOwnedModel):
    """A reference photo as uploaded, with the subject's face as the analyser found it."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="reference_images")
    character = models.ForeignKey(Character, on_delete=models.CASCADE, related_name="references")
    file = models.FileField(upload_to=reference_upload_to, max_length=300)
    sha256 = models.CharField(max_length=64)
    image_format = models.CharField(max_length=8)
    file_size = models.PositiveIntegerField()
    width = models.PositiveIntegerField(help_text="After EXIF orientation")
    height = models.PositiveIntegerField(help_text="After EXIF orientation")
    embedder = models.CharField(max_length=40)
    face_box = models.JSONField(help_text="[x1, y1, x2, y2] in pixels of the oriented image")
    landmarks = models.JSONField(help_text="5 keypoints [[x, y], ...]: eyes, nose tip, mouth corners")
    det_score = models.FloatField()
    quality = models.JSONField(default=dict, help_text="face size, sharpness, brightness figures")
    warnings = ArrayField(models.CharField(max_length=40), default=list, blank=True)
    other_faces = models.JSONField(default=list, blank=True, help_text="Boxes of smaller faces that were ignored")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["character", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["character", "sha256"], name="reference_unique_file_per_character")
        ]

    def __str__(self) -> str:
        return f"{self.character} reference {self.pk}"


class FaceEmbedding(TenantOwnedModel):
    """One reference's face embedding. `embedding` is an untyped vector (dimensions vary by embedder),
    stored inline (`STORAGE MAIN`, migration 0007) so exact scans read no TOAST; tenants with many
    rows get their own partial HNSW index (characters/search.py)."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="face_embeddings")
    character = models.ForeignKey(Character, on_delete=models.CASCADE, related_name="face_embeddings")
    reference = models.ForeignKey(ReferenceImage, on_delete=models.CASCADE, related_name="embeddings")
    embedder = models.CharField(max_length=40)
    dims = models.PositiveSmallIntegerField()
    embedding = VectorField(help_text="Unit vector (what search and identities compare)")
    raw_norm = models.FloatField(
        null=True,
        blank=True,
        help_text="Length of the embedder's raw output (insightface's `embedding`); unit vector × raw_norm is the "
        "raw embedding PuLID and InstantID feed their ID encoders. Empty for dlib (no meaningful raw length) "
        "and for rows enrolled before it was kept (`manage.py reembed_references` fills it).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["reference", "embedder"], name="embedding_unique_per_reference_embedder")
        ]
        indexes = [models.Index(fields=["tenant", "embedder"], name="embedding_tenant_embedder_idx")]


class CharacterIdentity(TenantOwnedModel):
    """A character's identity for one embedder: the renormalised mean of its reference embeddings.

    The table also has `embedding_bits`, a stored generated column `binary_quantize(embedding)`
    (migration 0007) that PostgreSQL computes on every write; only the platform-wide search reads it."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="character_identities")
    character = models.ForeignKey(Character, on_delete=models.CASCADE, related_name="identities")
    embedder = models.CharField(max_length=40)
    dims = models.PositiveSmallIntegerField()
    embedding = VectorField()
    reference_count = models.PositiveSmallIntegerField()
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "character identities"
        constraints = [
            models.UniqueConstraint(fields=["character", "embedder"], name="identity_unique_per_character_embedder")
        ]
        indexes = [models.Index(fields=["tenant", "embedder"], name="identity_tenant_embedder_idx")]


def import_upload_to(instance: "CharacterImport", filename: str) -> str:
    return f"tenants/{instance.tenant_id}/character-imports/{instance.archive_sha256}.zip"


class CharacterImport(Job):
    """Bulk enrolment of a zip of photos, one folder per character (folder name = character name),
    run on the CPU cluster with the lifecycle of `alkemy.jobs`.

    Each photo goes through the same service as a single upload; `report` has one entry per file of
    the archive: {"path", "character", "outcome" (enrolled | skipped | refused), "code", "message",
    "character_id", "reference_id", "similar": [...]}. Re-running an archive skips photos already
    enrolled (same file hash), so the job is idempotent and a re-queued one resumes where it stopped.
    """

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="character_imports")
    archive = models.FileField(upload_to=import_upload_to, max_length=300)
    archive_name = models.CharField(max_length=255, blank=True, help_text="File name as uploaded")
    archive_sha256 = models.CharField(max_length=64)
    archive_size = models.PositiveBigIntegerField()
    dry_run = models.BooleanField(default=False, help_text="Analyse and report only; nothing is enrolled")
    embedder = models.CharField(max_length=40, blank=True)
    report = models.JSONField(default=list, blank=True, help_text="One entry per file of the archive")
    total_files = models.PositiveIntegerField(default=0)
    enrolled_count = models.PositiveIntegerField(default=0)
    skipped_count = models.PositiveIntegerField(default=0, help_text="Photos already enrolled (same file hash)")
    refused_count = models.PositiveIntegerField(default=0)
    characters_created = models.PositiveIntegerField(default=0)
    duplicate_count = models.PositiveIntegerField(
        default=0, help_text="Photos whose face resembles another character (of the import or the registry)"
    )
    timings = models.JSONField(default=dict, blank=True, help_text="Seconds: unpack, analyse, enrol")
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_api_key = models.ForeignKey(
        "tenancy.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-queued_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="charimport_unique_idempotency_key_per_tenant",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in JobStatus]), name="charimport_status_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(progress__gte=0) & models.Q(progress__lte=1), name="charimport_progress_0_1"
            ),
        ]
        indexes = [models.Index(fields=["tenant", "status", "queued_at"], name="charimport_tenant_status_idx")]

    def __str__(self) -> str:
        return f"Character import #{self.pk} ({self.status})"
