from rest_framework.routers import SimpleRouter

from training.api import CharacterLoraViewSet, StyleLoraViewSet

router = SimpleRouter(trailing_slash=False)
router.register(r"characters/(?P<character_pk>[^/.]+)/loras", CharacterLoraViewSet, basename="character-lora")
router.register("style-loras", StyleLoraViewSet, basename="style-lora")

urlpatterns = router.urls
