"""`build_test_models`: every method's tiny components, in the layout of the model registry."""

from __future__ import annotations

from pathlib import Path

from generation.model_registry import COMPONENTS, component_path
from generation.tiny.base_models import write_flux, write_sdxl


def embedding_space_for(embedder: str | None, embedder_dims: int | None) -> tuple[str, int]:
    """(face embedder the tiny ID encoders are built for, their input width).

    Default: the active face embedder (`ALKEMY_FACE_EMBEDDER`; dlib offline) and its width. The name
    is written beside the weights (`model_registry.EMBEDDING_SPACE_MARKER`), so the methods refuse
    references from any other embedder, as they refuse non-antelopev2 ones with the released files.
    """
    from characters.faces import embedder_infos, resolve_embedder_name

    embedder = embedder or resolve_embedder_name()
    if embedder not in embedder_infos():
        raise ValueError(f"unknown face embedder {embedder!r}; known: {', '.join(embedder_infos())}")
    return embedder, embedder_dims or embedder_infos()[embedder].dims


def build_test_models(
    directory: Path, *, embedder: str | None = None, embedder_dims: int | None = None, progress: bool = False
) -> list[Path]:
    """Write all tiny models into `directory`; returns the component paths written.

    The ID encoders take `embedder`'s embeddings (see `embedding_space_for`). A tiny antelopev2 pack is
    written too (`generation.tiny.antelopev2`): `ALKEMY_FACE_EMBEDDER=arcface_antelopev2` runs the
    production face path on it; `auto` never picks it.
    """
    from generation.tiny.antelopev2 import write_antelopev2_pack
    from generation.tiny.instantid import write_instantid_components
    from generation.tiny.pulid import write_pulid_components

    embedder, embedder_dims = embedding_space_for(embedder, embedder_dims)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stages = [
        ("FLUX", lambda: write_flux(component_path(directory, "flux"))),
        ("PuLID", lambda: write_pulid_components(directory, embedder_dims=embedder_dims, embedder=embedder)),
        ("SDXL", lambda: write_sdxl(component_path(directory, "sdxl"))),
        ("InstantID", lambda: write_instantid_components(directory, embedder_dims=embedder_dims, embedder=embedder)),
        ("antelopev2", lambda: write_antelopev2_pack(directory)),
    ]
    if progress:  # `manage.py build_test_models`: one tick per family of models, on stderr
        import sys

        from tqdm import tqdm

        stages = tqdm(stages, desc="tiny models", unit="family", file=sys.stderr)
    results = [build() for _, build in stages]
    return [*(component_path(directory, key) for key in COMPONENTS), results[-1]]
