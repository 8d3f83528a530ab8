from django.urls import path
from rest_framework.routers import SimpleRouter

from characters.api import CharacterViewSet, FaceSearchView, ReferenceViewSet

router = SimpleRouter(trailing_slash=False)
router.register("characters", CharacterViewSet, basename="character")
router.register(r"characters/(?P<character_pk>[^/.]+)/references", ReferenceViewSet, basename="reference")

urlpatterns = [*router.urls, path("search/faces", FaceSearchView.as_view(), name="search-faces")]
