"""Shot lists: a storyboard rendered for characters × methods × shots, as ordinary generation jobs.

The shot list owns no job state of its own: its status and progress are read from its generation
jobs (`alkemy.jobs`), linked through `ShotJob` rows (the generation app's tables stay untouched).
`ShotOutput` caches each output's face embedding, so the consistency report is cheap to re-read.
"""

from django.conf import settings
from django.db import models

from alkemy.tenancy.scoping import TenantOwnedModel


class ShotList(TenantOwnedModel):
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="shot_lists")
    name = models.CharField(max_length=200)
    #: the characters in the order they were asked for (rows of the report and the contact sheet)
    character_ids = models.JSONField(default=list)
    methods = models.JSONField(default=list)
    images_per_shot = models.PositiveSmallIntegerField(default=1)
    #: per-method parameters merged over every shot's own `params` (e.g. `{"lora": {"lora_version": 2}}`)
    method_params = models.JSONField(default=dict, blank=True)
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    requested_by_api_key = models.ForeignKey(
        "tenancy.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="shotlist_unique_idempotency_key_per_tenant",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} (shot list #{self.pk})"


class Shot(TenantOwnedModel):
    """One storyboard frame: the prompt and render settings every character × method gets."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="shots")
    shot_list = models.ForeignKey(ShotList, on_delete=models.CASCADE, related_name="shots")
    index = models.PositiveIntegerField()
    prompt = models.TextField()
    negative_prompt = models.TextField(blank=True)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    steps = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: the method's default")
    guidance = models.FloatField(null=True, blank=True)
    #: the same seed for every character and method, so they are compared on the same noise
    seed = models.BigIntegerField()
    params = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["shot_list", "index"]
        constraints = [models.UniqueConstraint(fields=["shot_list", "index"], name="shot_unique_index")]

    def __str__(self) -> str:
        return f"Shot {self.index + 1}: {self.prompt[:60]}"


class ShotJob(TenantOwnedModel):
    """The link between a shot list and one of its generation jobs (one character × method × shot)."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="shot_jobs")
    shot_list = models.ForeignKey(ShotList, on_delete=models.CASCADE, related_name="shot_jobs")
    shot = models.ForeignKey(Shot, on_delete=models.CASCADE, related_name="shot_jobs")
    character = models.ForeignKey("characters.Character", on_delete=models.CASCADE, related_name="shot_jobs")
    method = models.CharField(max_length=32)
    job = models.OneToOneField("generation.GenerationJob", on_delete=models.CASCADE, related_name="shot_job")
    #: set on a re-roll: the output it was asked to replace
    reroll_of = models.ForeignKey(
        "generation.GeneratedImage", null=True, blank=True, on_delete=models.SET_NULL, related_name="rerolls"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["shot_list", "character", "method", "shot__index", "id"]
        indexes = [models.Index(fields=["shot_list", "character", "method"], name="shotjob_list_row_idx")]


class ShotOutput(TenantOwnedModel):
    """An output's face, measured once: its embedding and its similarity to the character's identity."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="shot_outputs")
    shot_job = models.ForeignKey(ShotJob, on_delete=models.CASCADE, related_name="outputs")
    output = models.OneToOneField("generation.GeneratedImage", on_delete=models.CASCADE, related_name="shot_output")
    embedder = models.CharField(max_length=40)
    #: unit vector of the output's main face; null when no face was found
    embedding = models.JSONField(null=True, blank=True)
    identity_similarity = models.FloatField(null=True, blank=True)
    #: why there is no similarity: `no_face`, `no_identity`, `unreadable`
    reason = models.CharField(max_length=40, blank=True)
    measured_at = models.DateTimeField(auto_now_add=True)
