from django.urls import path

from usage.api import BudgetView, UsageEventViewSet, UsageView

urlpatterns = [
    path("usage", UsageView.as_view(), name="usage"),
    path("usage/budget", BudgetView.as_view(), name="usage-budget"),
    path("usage/events", UsageEventViewSet.as_view({"get": "list"}), name="usage-events"),
]
