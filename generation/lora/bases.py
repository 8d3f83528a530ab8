"""The base models a LoRA can be made for, where their folders are, and their module trees on the meta device."""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from generation.methods.base import ModelMissing
from generation.model_registry import COMPONENTS, component_path


@dataclass(frozen=True)
class BaseSpec:
    key: str  # "sdxl" | "flux": also the model-registry component key
    label: str
    pipeline_class: str  # diffusers pipeline: loads the folder, converts and loads LoRAs
    denoiser: str  # the pipeline component LoRAs mostly target (and the only one diffusers can hot-swap)
    text_encoders: tuple[str, ...]  # components diffusers loads LoRA weights into besides the denoiser
    default_steps: int
    default_guidance: float

    @property
    def lora_components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)


BASES: dict[str, BaseSpec] = {
    "sdxl": BaseSpec("sdxl", "SDXL", "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"), 30, 5.0),
    # diffusers' FluxPipeline loads LoRAs into the transformer and CLIP, never into T5 (text_encoder_2)
    "flux": BaseSpec("flux", "FLUX.1", "FluxPipeline", "transformer", ("text_encoder",), 28, 3.5),
}


def base_spec(base_model: str) -> BaseSpec:
    try:
        return BASES[base_model]
    except KeyError:
        raise KeyError(f"unknown base model {base_model!r}; known: {', '.join(BASES)}") from None


def pipeline_class(spec: BaseSpec):
    import diffusers

    return getattr(diffusers, spec.pipeline_class)


def require_base(models_dir: Path, base_model: str) -> Path:
    """The base's diffusers folder; ModelMissing naming the first missing file (as `model_registry.require`)."""
    component = COMPONENTS[base_spec(base_model).key]
    folder = component_path(models_dir, component.key)
    missing = [folder / name if name else folder for name in component.files if not (folder / name).exists()]
    if missing:
        raise ModelMissing(
            f"LoRA generation on {component.key} needs {missing[0]} ({component.description}); "
            f"get it from {component.source}.",
            details={"base_model": base_model, "missing": [str(p) for p in missing], "source": component.source},
        )
    return folder


def meta_modules(models_dir: Path, base_model: str, component: str) -> dict[str, torch.nn.Module]:
    """`named_modules()` of one component of the base, built on the meta device from its config only.

    No weights are read (the web process may hold only the JSON configs), and the result is cached per
    config file, so checking an upload costs a dictionary lookup after the first one.
    """
    folder = component_path(models_dir, base_spec(base_model).key)
    config = folder / component / "config.json"
    if not config.exists():
        raise ModelMissing(
            f"Checking a {base_model} LoRA needs the base model's {config} (the config only).",
            details={"base_model": base_model, "missing": [str(config)]},
        )
    return _build_meta(str(folder), component, config.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _build_meta(folder: str, component: str, _mtime: int) -> dict[str, torch.nn.Module]:
    # model_index.json names each component's library and class, as the pipeline loader reads it.
    library, class_name = json.loads((Path(folder) / "model_index.json").read_text())[component]
    cls = getattr(importlib.import_module(library), class_name)
    path = Path(folder) / component
    with torch.device("meta"):
        if library == "diffusers":
            model = cls.from_config(cls.load_config(path))
        else:
            from transformers import AutoConfig

            model = cls(AutoConfig.from_pretrained(path))
    return dict(model.named_modules())
