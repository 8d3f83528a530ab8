"""The character registry: characters of a tenant, their reference photos and face identities."""

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from pgvector.django import VectorField

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
    """One reference's face embedding. `embedding` is an untyped vector: dimensions vary by embedder,
    and each embedder has its own partial expression HNSW index (see migration 0003)."""

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
    """A character's identity for one embedder: the renormalised mean of its reference embeddings."""

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
