"""Where each method's weights live under $ALKEMY_MODELS_DIR, and whether they are there.

Nothing is ever downloaded at run time: operators place the public files in this layout
(README "Model weights"), `manage.py check_models` reports what is missing, and a method whose
files are missing fails with `model_missing` naming the file. `manage.py build_test_models DIR`
writes tiny random models in exactly this layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from generation.methods.base import ModelMissing


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

#: the face embedder PuLID and InstantID were trained with (for production weights)
PRODUCTION_EMBEDDER = "arcface_antelopev2"

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
