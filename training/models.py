"""LoRA artifacts (uploaded now; trained here by the training issue) and tenants' style LoRAs."""

from django.conf import settings
from django.db import models

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
