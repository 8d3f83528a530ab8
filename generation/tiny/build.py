"""`build_test_models`: every method's tiny components, in the layout of the model registry."""

from __future__ import annotations

from pathlib import Path

from generation.model_registry import COMPONENTS, component_path
from generation.tiny.base_models import write_flux, write_sdxl


def build_test_models(directory: Path, *, embedder_dims: int | None = None) -> list[Path]:
    """Write all tiny models into `directory`; returns the component paths written."""
    from generation.tiny.instantid import write_instantid_components
    from generation.tiny.pulid import write_pulid_components

    if embedder_dims is None:
        from characters.faces import get_embedder

        embedder_dims = get_embedder().info.dims
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_flux(component_path(directory, "flux"))
    write_pulid_components(directory, embedder_dims=embedder_dims)
    write_sdxl(component_path(directory, "sdxl"))
    write_instantid_components(directory, embedder_dims=embedder_dims)
    return [component_path(directory, key) for key in COMPONENTS]
