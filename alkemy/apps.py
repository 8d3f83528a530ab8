from django.apps import AppConfig


class AlkemyConfig(AppConfig):
    """Project-level app: the pgvector extension migration and operator commands (demo)."""

    name = "alkemy"
    verbose_name = "Alkemy Cast"

    def ready(self) -> None:
        from alkemy.api import schema  # noqa: F401  (registers the OpenAPI auth extension)
