"""Generation jobs and their output images."""

from django.conf import settings
from django.db import models

from alkemy.jobs import Job, JobStatus
from alkemy.tenancy.scoping import TenantOwnedModel


class GenerationJob(Job):
    """One request to render a character: `num_images` images, one seed each."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="generation_jobs")
    character = models.ForeignKey("characters.Character", on_delete=models.CASCADE, related_name="generation_jobs")
    method = models.CharField(max_length=32, db_index=True)
    embedder = models.CharField(max_length=40, help_text="Face embedder of the identity the job was validated with")
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    steps = models.PositiveIntegerField()
    guidance = models.FloatField(null=True, blank=True)
    seed = models.BigIntegerField()
    num_images = models.PositiveSmallIntegerField(default=1)
    params = models.JSONField(default=dict, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_api_key = models.ForeignKey(
        "tenancy.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)
    device = models.CharField(max_length=64, blank=True, help_text="Where it ran, e.g. cuda:NVIDIA H100 or cpu")
    device_seconds = models.FloatField(null=True, blank=True, help_text="Time the method held the device")
    usage = models.JSONField(default=dict, blank=True, help_text="Metered quantities (tokens, images) to price")
    lora = models.ForeignKey(
        "training.LoraArtifact", null=True, blank=True, on_delete=models.SET_NULL, related_name="generation_jobs"
    )
    style_lora = models.ForeignKey(
        "training.StyleLora", null=True, blank=True, on_delete=models.SET_NULL, related_name="generation_jobs"
    )

    class Meta:
        ordering = ["-queued_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="generation_unique_idempotency_key_per_tenant",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in JobStatus]), name="generation_status_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(progress__gte=0) & models.Q(progress__lte=1), name="generation_progress_0_1"
            ),
        ]
        indexes = [models.Index(fields=["tenant", "status", "queued_at"], name="generation_tenant_status_idx")]

    def __str__(self) -> str:
        return f"Generation #{self.pk} ({self.method}, {self.status})"


def output_upload_to(instance: "GeneratedImage", filename: str) -> str:
    return f"tenants/{instance.tenant_id}/generations/{instance.job_id}/{filename}"


class GeneratedImage(TenantOwnedModel):
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="generated_images")
    job = models.ForeignKey(GenerationJob, on_delete=models.CASCADE, related_name="outputs")
    index = models.PositiveSmallIntegerField()
    file = models.FileField(upload_to=output_upload_to, max_length=300)
    seed = models.BigIntegerField()
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    identity_similarity = models.FloatField(null=True, blank=True)
    identity_reason = models.CharField(max_length=40, blank=True, help_text="Why there is no similarity")
    face_box = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "index"]
        constraints = [models.UniqueConstraint(fields=["job", "index"], name="generated_image_unique_index")]
