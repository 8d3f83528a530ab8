from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from alkemy.api.fields import StrictBooleanField, StrictCharField, StrictModelSerializer, StrictSlugField
from characters.models import Character, CharacterImport, ReferenceImage


class CharacterSerializer(StrictModelSerializer):
    slug = StrictSlugField(max_length=100, required=False, allow_blank=True)
    tags = serializers.ListField(child=StrictCharField(max_length=50), required=False, max_length=20)
    archived = StrictBooleanField(source="is_archived", required=False)
    reference_count = serializers.SerializerMethodField()

    class Meta:
        model = Character
        fields = [
            "id",
            "name",
            "slug",
            "description",
            "tags",
            "archived",
            "reference_count",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "reference_count", "created_at", "updated_at"]

    def get_reference_count(self, obj) -> int:
        count = getattr(obj, "reference_count", None)
        return count if count is not None else ReferenceImage.objects.unscoped().filter(character=obj).count()

    def to_representation(self, instance) -> dict:
        """What DRF's fields answer (tests/test_load_paths.py compares them), built directly: the character list
        serialises up to 200 rows a request and DRF's per-field machinery was most of its time (bench/load.py)."""
        return {
            "id": instance.pk,
            "name": instance.name,
            "slug": instance.slug,
            "description": instance.description,
            "tags": list(instance.tags),
            "archived": instance.is_archived,
            "reference_count": self.get_reference_count(instance),
            "created_at": _iso_datetime(instance.created_at),
            "updated_at": _iso_datetime(instance.updated_at),
        }

    @staticmethod
    def rows_representation(rows) -> list[dict]:
        """`to_representation` of `selectors.CharacterRows` tuples (the list's page): the same dicts without a
        model instance per row (tests/test_load_paths.py compares them with DRF's fields)."""
        results = []
        for pk, name, slug, description, tags, archived, reference_count, created, updated in rows:
            if created.__class__ is not str:  # a time zone other than UTC: datetimes, formatted here
                created, updated = _iso_datetime(created), _iso_datetime(updated)
            results.append(
                {
                    "id": pk,
                    "name": name,
                    "slug": slug,
                    "description": description,
                    "tags": tags,
                    "archived": archived,
                    "reference_count": reference_count,
                    "created_at": created,
                    "updated_at": updated,
                }
            )
        return results


def _iso_datetime(value) -> str | None:
    """DRF's DateTimeField output: ISO 8601 in the current time zone, UTC as `Z`."""
    if value is None:
        return None
    text = timezone.localtime(value).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class ReferenceImageSerializer(serializers.ModelSerializer):
    image_url = serializers.SerializerMethodField()

    class Meta:
        model = ReferenceImage
        fields = [
            "id",
            "character",
            "image_url",
            "sha256",
            "image_format",
            "file_size",
            "width",
            "height",
            "embedder",
            "face_box",
            "landmarks",
            "det_score",
            "quality",
            "warnings",
            "other_faces",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.CharField())
    def get_image_url(self, obj) -> str:
        request = self.context.get("request")
        path = f"/api/v1/characters/{obj.character_id}/references/{obj.pk}/image"
        return request.build_absolute_uri(path) if request else path


class SimilarCharacterSerializer(serializers.Serializer):
    character = CharacterSerializer()
    similarity = serializers.FloatField(help_text="Cosine similarity of the face embeddings (1 = identical)")
    is_match = serializers.BooleanField(help_text="At or above the embedder's same-person threshold")
    reference = serializers.IntegerField(source="reference_id", allow_null=True, help_text="Best-matching reference")


class ReferenceCreatedSerializer(ReferenceImageSerializer):
    similar_characters = serializers.SerializerMethodField(
        help_text="Other characters of the tenant above the duplicate threshold: possible duplicates (not refused)"
    )

    class Meta(ReferenceImageSerializer.Meta):
        fields = [*ReferenceImageSerializer.Meta.fields, "similar_characters"]
        read_only_fields = fields

    @extend_schema_field(SimilarCharacterSerializer(many=True))
    def get_similar_characters(self, obj):
        return SimilarCharacterSerializer(self.context["similar_characters"], many=True, context=self.context).data


class ImageUploadSerializer(serializers.Serializer):
    # Empty files reach the service, which answers 422 invalid_image like any other unreadable photo.
    image = serializers.FileField(
        allow_empty_file=True, help_text="JPEG, PNG or WebP photo (content is sniffed, not the file name)"
    )


class FaceSearchRequestSerializer(ImageUploadSerializer):
    limit = serializers.IntegerField(default=10, min_value=1, max_value=100)
    min_similarity = serializers.FloatField(required=False, min_value=-1.0, max_value=1.0)


class SimilarQuerySerializer(serializers.Serializer):
    limit = serializers.IntegerField(default=10, min_value=1, max_value=100)
    min_similarity = serializers.FloatField(required=False, min_value=-1.0, max_value=1.0)


class DetectedFaceSerializer(serializers.Serializer):
    box = serializers.ListField(child=serializers.FloatField())
    det_score = serializers.FloatField()


class FaceSearchResponseSerializer(serializers.Serializer):
    embedder = serializers.CharField()
    match_threshold = serializers.FloatField()
    face = DetectedFaceSerializer()
    other_faces = DetectedFaceSerializer(many=True)
    results = SimilarCharacterSerializer(many=True)


class SimilarResponseSerializer(serializers.Serializer):
    embedder = serializers.CharField()
    match_threshold = serializers.FloatField()
    results = SimilarCharacterSerializer(many=True)


# --- bulk imports ---------------------------------------------------------------------------------


class CharacterImportRequestSerializer(serializers.Serializer):
    archive = serializers.FileField(
        allow_empty_file=True,
        help_text="A zip of one folder per character (folder name = character name) holding 1-5 photos each",
    )
    dry_run = StrictBooleanField(default=False, help_text="Analyse and report only; enrol nothing")


class ImportSimilarSerializer(serializers.Serializer):
    character_id = serializers.IntegerField()
    name = serializers.CharField()
    similarity = serializers.FloatField()
    is_match = serializers.BooleanField()


class ImportFileSerializer(serializers.Serializer):
    path = serializers.CharField(help_text="The file's path in the archive")
    character = serializers.CharField(help_text="Its folder's name: the character's name")
    outcome = serializers.ChoiceField(["enrolled", "skipped", "refused", "would_enrol"])
    code = serializers.CharField(
        help_text="Why it was refused or skipped (the codes of a single upload, and "
        "not_in_a_folder, nested_folder, too_many_photos, duplicate_photo, already_enrolled)"
    )
    message = serializers.CharField()
    character_id = serializers.IntegerField(allow_null=True)
    reference_id = serializers.IntegerField(allow_null=True)
    warnings = serializers.ListField(child=serializers.CharField(), required=False)
    similar = ImportSimilarSerializer(
        many=True, required=False, help_text="Other characters whose identity resembles this one: possible duplicates"
    )


class CharacterImportSerializer(serializers.ModelSerializer):
    error = serializers.SerializerMethodField()
    report = ImportFileSerializer(many=True, read_only=True)

    class Meta:
        model = CharacterImport
        fields = [
            "id", "status", "progress", "current_step", "total_steps", "dry_run", "archive_name", "archive_size",
            "embedder", "total_files", "enrolled_count", "skipped_count", "refused_count", "characters_created",
            "duplicate_count", "error", "report", "attempt", "queued_at", "started_at", "finished_at",
        ]  # fmt: skip
        read_only_fields = fields

    def get_error(self, obj) -> dict | None:
        if not obj.error_code:
            return None
        return {"code": obj.error_code, "message": obj.error_message, "details": obj.error_details}
