"""Where each method's weights live under $ALKEMY_MODELS_DIR, and whether they are there.

Nothing is ever downloaded at run time: operators place the public files in this layout
(README "Model weights"), `manage.py check_models` reports what is missing, and a method whose
files are missing fails with `model_missing` naming the file. `manage.py build_test_models DIR`
writes tiny random models in exactly this layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from generation.methods.base import InvalidWeights, ModelMissing


@dataclass(frozen=True)
class Component:
    key: str
    path: str  # relative to the models dir
    files: tuple[str, ...]  # files that must exist under `path` ("" = `path` itself is the file)
    source: str  # where the real file comes from
    description: str


DIFFUSERS_FOLDER_FILES = ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json")

COMPONENTS: dict[str, Component] = {
    c.key: c
    for c in [
        Component(
            "flux",
            "flux1-dev",
            (
                *DIFFUSERS_FOLDER_FILES,
                "transformer/config.json",
                "text_encoder/config.json",
                "text_encoder_2/config.json",
                "tokenizer",
                "tokenizer_2",
            ),
            "https://huggingface.co/black-forest-labs/FLUX.1-dev (diffusers folder)",
            "FLUX.1-dev: transformer, VAE, CLIP-L and T5-XXL text encoders",
        ),
        Component(
            "pulid_flux_weights",
            "pulid/pulid_flux_v0.9.1.safetensors",
            ("",),
            "https://huggingface.co/guozinan/PuLID (pulid_flux_v0.9.1.safetensors)",
            "PuLID-FLUX ID encoder (IDFormer) and 20 cross-attention modules",
        ),
        Component(
            "eva_clip",
            "eva_clip/EVA02_CLIP_L_336_psz14_s6B.pt",
            ("",),
            "https://huggingface.co/QuanSun/EVA-CLIP (EVA02_CLIP_L_336_psz14_s6B.pt)",
            "EVA02-CLIP-L-14-336 vision tower (PuLID's face feature extractor)",
        ),
        Component(
            "face_parsing",
            "facexlib/parsing_bisenet.pth",
            ("",),
            "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
            "BiSeNet face parsing (keeps the face, greys out the background before EVA-CLIP)",
        ),
        Component(
            "sdxl",
            "stable-diffusion-xl-base-1.0",
            (
                *DIFFUSERS_FOLDER_FILES,
                "unet/config.json",
                "text_encoder/config.json",
                "text_encoder_2/config.json",
                "tokenizer",
                "tokenizer_2",
            ),
            "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0 (diffusers folder)",
            "SDXL base 1.0: UNet, VAE, two CLIP text encoders",
        ),
        Component(
            "instantid_controlnet",
            "instantid/ControlNetModel",
            ("config.json", "diffusion_pytorch_model.safetensors"),
            "https://huggingface.co/InstantX/InstantID (ControlNetModel/)",
            "IdentityNet: ControlNet on the 5 face keypoints, conditioned on the ID tokens",
        ),
        Component(
            "instantid_ip_adapter",
            "instantid/ip-adapter.bin",
            ("",),
            "https://huggingface.co/InstantX/InstantID (ip-adapter.bin)",
            "IP-Adapter: Resampler over the ArcFace embedding + decoupled cross-attention weights",
        ),
    ]
}

#: the face embedder PuLID and InstantID were trained with: the embedding space the released files expect
PRODUCTION_EMBEDDER = "arcface_antelopev2"

#: the ID-encoder weights of each method that takes face embeddings; their embedding space is declared
#: by `EMBEDDING_SPACE_MARKER` in the same folder, else it is the released files' (`PRODUCTION_EMBEDDER`)
ID_ENCODER_COMPONENTS: dict[str, str] = {"pulid_flux": "pulid_flux_weights", "instantid_sdxl": "instantid_ip_adapter"}
#: `{"embedder": "<name>"}` beside weights not trained on antelopev2 (`build_test_models` writes it)
EMBEDDING_SPACE_MARKER = "embedding_space.json"

METHOD_COMPONENTS: dict[str, tuple[str, ...]] = {
    "pulid_flux": ("flux", "pulid_flux_weights", "eva_clip", "face_parsing"),
    "instantid_sdxl": ("sdxl", "instantid_controlnet", "instantid_ip_adapter"),
    "lora": ("sdxl", "flux"),  # a LoRA job needs only the base it was trained for
    "gemini": (),  # remote: no weights
}


def component_path(models_dir: Path, key: str) -> Path:
    return Path(models_dir) / COMPONENTS[key].path


def missing_files(models_dir: Path, method: str) -> list[Path]:
    """Every required file of `method` that is not present (empty list: ready)."""
    missing = []
    for key in METHOD_COMPONENTS[method]:
        component = COMPONENTS[key]
        base = component_path(models_dir, key)
        for name in component.files:
            path = base / name if name else base
            if not path.exists():
                missing.append(path)
    return missing


def require(models_dir: Path, method: str) -> None:
    """Raise ModelMissing naming the first missing file of `method` and where it comes from."""
    missing = missing_files(models_dir, method)
    if missing:
        first = missing[0]
        component = next(
            COMPONENTS[k]
            for k in METHOD_COMPONENTS[method]
            if str(first).startswith(str(component_path(models_dir, k)))
        )
        raise ModelMissing(
            f"Method '{method}' needs {first} ({component.description}); get it from {component.source}.",
            details={"method": method, "missing": [str(p) for p in missing], "source": component.source},
        )


@dataclass(frozen=True)
class EmbeddingSpace:
    """The face embedder whose embeddings a method's weights take, and who says so."""

    embedder: str
    declared_by: str  # the marker file, or "the released weights"


def embedding_space_marker(models_dir: Path, method: str) -> Path:
    return component_path(models_dir, ID_ENCODER_COMPONENTS[method]).parent / EMBEDDING_SPACE_MARKER


def embedding_space(models_dir: Path, method: str) -> EmbeddingSpace | None:
    """What embeddings `method`'s weights in `models_dir` take; None for a method without an ID encoder.

    Embedding spaces are not interchangeable: a 512-d vector of another model (buffalo_l's w600k_r50)
    means nothing to encoders trained on antelopev2's glintr100. An unreadable marker is InvalidWeights.
    """
    if method not in ID_ENCODER_COMPONENTS:
        return None
    marker = embedding_space_marker(models_dir, method)
    if not marker.is_file():
        return EmbeddingSpace(PRODUCTION_EMBEDDER, "the released weights")
    try:
        embedder = json.loads(marker.read_text())["embedder"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidWeights(
            f'{marker} should be {{"embedder": "<face embedder name>"}}: {exc}', details={"file": str(marker)}
        ) from None
    if not isinstance(embedder, str) or not embedder:
        raise InvalidWeights(f"{marker} names no face embedder.", details={"file": str(marker)})
    return EmbeddingSpace(embedder, str(marker))


def weights_present(models_dir: Path, method: str) -> bool:
    """Whether `method`'s ID-encoder file is in `models_dir` (so its embedding space is known)."""
    return method in ID_ENCODER_COMPONENTS and component_path(models_dir, ID_ENCODER_COMPONENTS[method]).exists()


def write_embedding_space(models_dir: Path, method: str, embedder: str) -> Path:
    """Declare that `method`'s weights in `models_dir` take `embedder`'s embeddings (test weights)."""
    marker = embedding_space_marker(models_dir, method)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"embedder": embedder}) + "\n")
    return marker
