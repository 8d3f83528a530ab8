from django.apps import AppConfig


class ShotlistsConfig(AppConfig):
    name = "shotlists"
    verbose_name = "Shot lists"
