from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from shotlists.models import Shot, ShotList


class ShotSerializer(serializers.Serializer):
    prompt = serializers.CharField(max_length=4000)
    negative_prompt = serializers.CharField(max_length=4000, required=False, allow_blank=True, default="")
    width = serializers.IntegerField(required=False, default=1024, help_text="Default 1024")
    height = serializers.IntegerField(required=False, default=1024, help_text="Default 1024")
    steps = serializers.IntegerField(required=False, allow_null=True, default=None,
                                     help_text="Default: the method's")  # fmt: skip
    guidance = serializers.FloatField(required=False, allow_null=True, default=None)
    seed = serializers.IntegerField(
        required=False, allow_null=True, default=None,
        help_text="Default: a random seed, the same for every character and method of the shot",
    )  # fmt: skip
    params = serializers.DictField(required=False, default=dict, help_text="Method parameters, e.g. id_weight")


class ShotListCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    characters = serializers.ListField(child=serializers.IntegerField(), allow_empty=True)
    methods = serializers.ListField(
        child=serializers.CharField(max_length=32), required=False, default=list,
        help_text="Default: the default method (pulid_flux)",
    )  # fmt: skip
    shots = serializers.ListField(child=ShotSerializer(), allow_empty=True)
    images_per_shot = serializers.IntegerField(required=False, default=1, help_text="Default 1")
    method_params = serializers.DictField(
        child=serializers.DictField(), required=False, default=dict,
        help_text="Parameters per method, merged over each shot's params (e.g. {\"lora\": {\"lora_version\": 2}})",
    )  # fmt: skip
    idempotency = serializers.CharField(
        max_length=200, required=False, allow_null=True, default=None,
        help_text="A retry with the same key and body returns the same shot list (or the Idempotency-Key header)",
    )  # fmt: skip


class RerollSerializer(serializers.Serializer):
    outputs = serializers.ListField(
        child=serializers.IntegerField(), required=False, default=list,
        help_text="Output ids to render again with new seeds; empty or absent: every outlier of the report",
    )  # fmt: skip


class ShotListSerializer(serializers.ModelSerializer):
    characters = serializers.ListField(source="character_ids", child=serializers.IntegerField(), read_only=True)
    shots = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()
    jobs = serializers.SerializerMethodField()

    class Meta:
        model = ShotList
        fields = ["id", "name", "characters", "methods", "images_per_shot", "method_params", "shots", "progress",
                  "jobs", "created_at"]  # fmt: skip
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_progress(self, obj) -> dict:
        from shotlists.selectors import shotlist_progress

        return shotlist_progress(shot_list=obj)

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_shots(self, obj) -> list:
        return [
            {"index": s.index, "prompt": s.prompt, "negative_prompt": s.negative_prompt, "width": s.width,
             "height": s.height, "steps": s.steps, "guidance": s.guidance, "seed": s.seed, "params": s.params}
            for s in Shot.objects.unscoped().filter(shot_list=obj).order_by("index")
        ]  # fmt: skip

    @extend_schema_field(serializers.ListField(child=serializers.DictField()))
    def get_jobs(self, obj) -> list:
        """Every job of the list: which shot, character and method, its status and progress."""
        if not self.context.get("with_jobs", True):
            return []
        from shotlists.selectors import shotlist_jobs

        return [
            {"job": link.job_id, "shot": link.shot.index, "character": link.character_id, "method": link.method,
             "status": link.job.status, "progress": round(link.job.progress, 4), "seed": link.job.seed,
             "reroll_of": link.reroll_of_id,
             "error": {"code": link.job.error_code, "message": link.job.error_message} if link.job.error_code else None,
             "url": f"/api/v1/generations/{link.job_id}"}
            for link in shotlist_jobs(shot_list=obj)
        ]  # fmt: skip
