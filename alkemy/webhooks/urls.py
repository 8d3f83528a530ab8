from django.urls import path
from rest_framework.routers import SimpleRouter

from alkemy.webhooks.api import WebhookEndpointViewSet

router = SimpleRouter(trailing_slash=False)
router.register("webhooks", WebhookEndpointViewSet, basename="webhook")

urlpatterns = [
    *router.urls,
    path(
        "webhooks/<str:pk>/deliveries", WebhookEndpointViewSet.as_view({"get": "deliveries"}), name="webhook-deliveries"
    ),
]
