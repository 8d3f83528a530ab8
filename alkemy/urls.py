from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from alkemy.admin_login import ThrottledAdminAuthenticationForm
from alkemy.api.health import HealthView
from alkemy.api.tenant import TenantView
from alkemy.metrics import metrics_view

admin.site.site_header = "Alkemy Cast"
admin.site.site_title = "Alkemy Cast admin"
admin.site.index_title = "Characters, generations and tenants"
admin.site.login_form = ThrottledAdminAuthenticationForm  # failed logins per username and address

api_v1 = [
    path("health", HealthView.as_view(), name="health"),
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    path("tenant", TenantView.as_view(), name="tenant"),
    path("docs", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    path("", include("characters.urls")),
    path("", include("generation.urls")),
    path("", include("training.urls")),
    path("", include("usage.urls")),
    path("", include("shotlists.urls")),
    path("", include("alkemy.webhooks.urls")),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("metrics", metrics_view, name="metrics"),  # Prometheus, Bearer $ALKEMY_METRICS_TOKEN
]

# Media files are never served by URL alone: every download goes through a view that checks the tenant.
handler400 = "alkemy.api.errors.handler400"
handler404 = "alkemy.api.errors.handler404"
handler500 = "alkemy.api.errors.handler500"
