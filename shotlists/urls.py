from rest_framework.routers import SimpleRouter

from shotlists.api import ShotListViewSet

router = SimpleRouter(trailing_slash=False)
router.register("shotlists", ShotListViewSet, basename="shotlist")

urlpatterns = router.urls
