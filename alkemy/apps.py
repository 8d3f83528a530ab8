from django.apps import AppConfig


class AlkemyConfig(AppConfig):
    """Project-level app: the pgvector extension migration and operator commands (demo)."""

    name = "alkemy"
    verbose_name = "Alkemy Cast"
