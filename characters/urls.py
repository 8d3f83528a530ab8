from django.urls import path
from rest_framework.routers import SimpleRouter

from characters.api import (
    CharacterImportCreateView,
    CharacterImportViewSet,
    CharacterViewSet,
    FaceSearchView,
    ReferenceViewSet,
)

router = SimpleRouter(trailing_slash=False)
router.register("characters", CharacterViewSet, basename="character")
router.register(r"characters/(?P<character_pk>[^/.]+)/references", ReferenceViewSet, basename="reference")

# Imports first: `characters/import(s)` would otherwise be taken for a character id.
imports = SimpleRouter(trailing_slash=False)
imports.register("characters/imports", CharacterImportViewSet, basename="character-import")

urlpatterns = [
    path("characters/import", CharacterImportCreateView.as_view(), name="character-import-create"),
    *imports.urls,
    *router.urls,
    path("search/faces", FaceSearchView.as_view(), name="search-faces"),
]
