from rest_framework.routers import SimpleRouter

from characters.api import CharacterViewSet

router = SimpleRouter(trailing_slash=False)
router.register("characters", CharacterViewSet, basename="character")

urlpatterns = router.urls
