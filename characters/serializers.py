from rest_framework import serializers

from characters.models import Character


class CharacterSerializer(serializers.ModelSerializer):
    slug = serializers.SlugField(max_length=100, required=False, allow_blank=True)
    tags = serializers.ListField(child=serializers.CharField(max_length=50), required=False, max_length=20)
    archived = serializers.BooleanField(source="is_archived", required=False)

    class Meta:
        model = Character
        fields = ["id", "name", "slug", "description", "tags", "archived", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
