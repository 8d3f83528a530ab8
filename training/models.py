"""LoRA artifacts (uploaded or trained here), tenants' style LoRAs, and the jobs that train character LoRAs."""

from django.conf import settings
from django.db import models

from alkemy.jobs import Job, JobStatus
from alkemy.tenancy.scoping import TenantOwnedModel


class BaseModel(models.TextChoices):
    SDXL = "sdxl", "SDXL base 1.0"
    FLUX = "flux", "FLUX.1-dev"


class LoraFormat(models.TextChoices):
    DIFFUSERS = "diffusers", "diffusers / peft"
    KOHYA = "kohya", "kohya (converted on load)"


def lora_upload_to(instance, filename: str) -> str:
    return f"tenants/{instance.tenant_id}/loras/{instance.sha256}.safetensors"


class LoraArtifact(TenantOwnedModel):
    """A LoRA of one character (trained here or uploaded), versioned; one version is selected."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="lora_artifacts")
    character = models.ForeignKey("characters.Character", on_delete=models.CASCADE, related_name="loras")
    version = models.PositiveIntegerField()
    base_model = models.CharField(max_length=16, choices=BaseModel.choices)
    file = models.FileField(upload_to=lora_upload_to, max_length=300)
    sha256 = models.CharField(max_length=64)
    file_size = models.PositiveBigIntegerField()
    lora_format = models.CharField(max_length=16, choices=LoraFormat.choices)
    rank = models.PositiveIntegerField(null=True, blank=True)
    trigger_token = models.CharField(max_length=100, blank=True, help_text="Inserted into prompts automatically")
    source = models.CharField(max_length=16, choices=[("trained", "Trained here"), ("uploaded", "Uploaded")])
    is_selected = models.BooleanField(default=False, help_text="The version generations use")
    metadata = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["character", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["character", "version"], name="lora_unique_version_per_character"),
            models.UniqueConstraint(
                fields=["character"], condition=models.Q(is_selected=True), name="lora_one_selected_per_character"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.character} LoRA v{self.version} ({self.base_model})"


class StyleLora(TenantOwnedModel):
    """A tenant's style LoRA, combinable with a character LoRA at generation time."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="style_loras")
    name = models.CharField(max_length=100)
    base_model = models.CharField(max_length=16, choices=BaseModel.choices)
    file = models.FileField(upload_to=lora_upload_to, max_length=300)
    sha256 = models.CharField(max_length=64)
    file_size = models.PositiveBigIntegerField()
    lora_format = models.CharField(max_length=16, choices=LoraFormat.choices)
    rank = models.PositiveIntegerField(null=True, blank=True)
    trigger_token = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant", "name"]
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="style_lora_unique_name_per_tenant")]

    def __str__(self) -> str:
        return self.name


def training_upload_to(instance: "TrainingJob", filename: str) -> str:
    return f"tenants/{instance.tenant_id}/trainings/{instance.pk}/{filename}"


class TrainingJob(Job):
    """Train a LoRA of one character from its reference photos (the lifecycle of `alkemy.jobs`).

    Succeeds with a new `LoraArtifact` version of the character (`lora`). While it runs, a checkpoint
    (LoRA weights, optimizer, step, RNG) is written every few steps to `checkpoint_file`, so a job re-queued
    after its worker died resumes from `checkpoint_step` (recorded in `resumed_from_step`).
    """

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="training_jobs")
    character = models.ForeignKey("characters.Character", on_delete=models.CASCADE, related_name="training_jobs")
    base_model = models.CharField(max_length=16, choices=BaseModel.choices)
    steps = models.PositiveIntegerField()
    rank = models.PositiveIntegerField()
    alpha = models.FloatField()
    learning_rate = models.FloatField()
    lr_schedule = models.CharField(max_length=16, default="constant", help_text="constant | cosine, after warm-up")
    warmup_steps = models.PositiveIntegerField(default=0)
    resolution = models.PositiveIntegerField()
    trigger_token = models.CharField(max_length=100)
    captions = models.JSONField(default=dict, blank=True, help_text="Caption per reference id (others: the default)")
    seed = models.BigIntegerField()
    validation_prompt = models.TextField(blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_api_key = models.ForeignKey(
        "tenancy.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)

    # -- the run --------------------------------------------------------------------------------------
    device = models.CharField(max_length=64, blank=True, help_text="Where it ran, e.g. cuda:NVIDIA H100 or cpu")
    device_seconds = models.FloatField(null=True, blank=True, help_text="Time the trainer held the device")
    usage = models.JSONField(default=dict, blank=True, help_text="Metered quantities (device seconds, steps)")
    loss = models.FloatField(null=True, blank=True, help_text="Mean training loss of the last logged steps")
    loss_history = models.JSONField(default=list, blank=True, help_text="[[step, mean loss], ...]")
    steps_per_second = models.FloatField(null=True, blank=True)
    timings = models.JSONField(default=dict, blank=True, help_text="Seconds: load, prepare, train, save")
    checkpoint_file = models.CharField(max_length=300, blank=True)
    checkpoint_step = models.PositiveIntegerField(default=0)
    resumed_from_step = models.PositiveIntegerField(null=True, blank=True)
    lora = models.ForeignKey(
        LoraArtifact, null=True, blank=True, on_delete=models.SET_NULL, related_name="training_jobs"
    )
    validation_image = models.FileField(upload_to=training_upload_to, max_length=300, blank=True)
    validation_identity_similarity = models.FloatField(null=True, blank=True)
    validation_identity_reason = models.CharField(max_length=40, blank=True)

    class Meta:
        ordering = ["-queued_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="training_unique_idempotency_key_per_tenant",
            ),
            models.CheckConstraint(
                condition=models.Q(status__in=[s.value for s in JobStatus]), name="training_status_valid"
            ),
            models.CheckConstraint(
                condition=models.Q(progress__gte=0) & models.Q(progress__lte=1), name="training_progress_0_1"
            ),
        ]
        indexes = [models.Index(fields=["tenant", "status", "queued_at"], name="training_tenant_status_idx")]

    def __str__(self) -> str:
        return f"Training #{self.pk} ({self.base_model}, {self.status})"
