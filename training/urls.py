from django.urls import path
from rest_framework.routers import SimpleRouter

from training.api import CharacterLoraViewSet, StyleLoraViewSet
from training.api_trainings import LoraFileView, TrainingViewSet

router = SimpleRouter(trailing_slash=False)
router.register(r"characters/(?P<character_pk>[^/.]+)/loras", CharacterLoraViewSet, basename="character-lora")
router.register("style-loras", StyleLoraViewSet, basename="style-lora")
router.register("trainings", TrainingViewSet, basename="training")

urlpatterns = [
    path("characters/<int:character_pk>/loras/<int:pk>/file", LoraFileView.as_view(), name="character-lora-file"),
    *router.urls,
]
