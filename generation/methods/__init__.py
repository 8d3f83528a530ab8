"""Generation methods, looked up by key. Adding a method is adding a module and one line here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from generation.methods.base import GenerationMethod

#: method key → "module:Class"
METHODS: dict[str, str] = {
    "pulid_flux": "generation.methods.pulid_flux:PulidFluxMethod",
    "instantid_sdxl": "generation.methods.instantid_sdxl:InstantIdSdxlMethod",
    "lora": "generation.methods.lora:LoraMethod",
    "gemini": "generation.methods.gemini:GeminiMethod",
}
DEFAULT_METHOD = "pulid_flux"

#: default denoising steps per method, readable without importing torch/diffusers (the web process
#: validates requests with it; each class's `default_steps` says the same)
DEFAULT_STEPS: dict[str, int] = {"pulid_flux": 28, "instantid_sdxl": 30, "lora": 30, "gemini": 1}

#: the worker cluster of each method (each class's `cluster` says the same): remote APIs need no GPU
METHOD_CLUSTERS: dict[str, str] = {"pulid_flux": "gpu", "instantid_sdxl": "gpu", "lora": "gpu", "gemini": "default"}

#: methods that generate from the character's face identity (reference photos); the others
#: (a LoRA) carry the identity in their weights
IDENTITY_METHODS = frozenset({"pulid_flux", "instantid_sdxl", "gemini"})


def method_class(key: str) -> type[GenerationMethod]:
    if key not in METHODS:
        raise KeyError(f"unknown generation method {key!r}; known: {', '.join(METHODS)}")
    module_name, class_name = METHODS[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)
