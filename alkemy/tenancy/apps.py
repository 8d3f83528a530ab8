from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "alkemy.tenancy"
    label = "tenancy"
    verbose_name = "Tenants and access"
