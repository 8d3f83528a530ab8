from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "alkemy.webhooks"
    label = "webhooks"
    verbose_name = "Webhooks"
