from rest_framework.routers import SimpleRouter

from generation.api import GenerationViewSet

router = SimpleRouter(trailing_slash=False)
router.register("generations", GenerationViewSet, basename="generation")

urlpatterns = router.urls
