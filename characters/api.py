"""Character registry endpoints. Thin: parse, call one service or selector, render."""

from rest_framework import status
from rest_framework.response import Response

from alkemy.api.base import TenantModelViewSet
from characters import selectors, services
from characters.filters import CharacterFilter
from characters.serializers import CharacterSerializer


def _creator_kwargs(request) -> dict:
    from alkemy.tenancy.authentication import ApiKeyPrincipal

    if isinstance(request.user, ApiKeyPrincipal):
        return {"created_by_api_key": request.user.api_key}
    return {"created_by": request.user}


class CharacterViewSet(TenantModelViewSet):
    """The tenant's characters. `?search=` matches name and description, `?tag=` a tag."""

    serializer_class = CharacterSerializer
    filterset_class = CharacterFilter
    search_fields = ["name", "description", "slug"]
    ordering_fields = ["name", "created_at", "updated_at"]
    ordering = ["name"]

    def get_queryset(self):
        return selectors.character_list(tenant=self.tenant)

    def get_object(self):
        character = selectors.character_get(tenant=self.tenant, character_id=self.kwargs["pk"])
        self.check_object_permissions(self.request, character)
        return character

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        character = services.character_create(
            tenant=self.tenant,
            name=data["name"],
            slug=data.get("slug", ""),
            description=data.get("description", ""),
            tags=data.get("tags", []),
            **_creator_kwargs(request),
        )
        return Response(self.get_serializer(character).data, status=status.HTTP_201_CREATED)

    def update(self, request, *args, **kwargs):
        partial = kwargs.pop("partial", False)
        character = self.get_object()
        serializer = self.get_serializer(character, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        character = services.character_update(character=character, **serializer.validated_data)
        return Response(self.get_serializer(character).data)

    def perform_destroy(self, instance):
        services.character_delete(character=instance)
