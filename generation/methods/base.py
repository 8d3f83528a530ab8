"""What every generation method shares: the request it gets, how it loads, how it reports progress.

A method module defines one `GenerationMethod` subclass and registers it (methods/__init__.py).
The small interface, after diffusers' one-pipeline-per-file style:

    method = MethodClass.load(models_dir, options)        # weights → device, once per worker
    images = method.generate(request, on_step)             # list[PIL.Image], on_step(step, total)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from alkemy.errors import AlkemyError

StepCallback = Callable[[int, int], None]


class ModelMissing(AlkemyError):
    """A weight file a method needs is not in $ALKEMY_MODELS_DIR (never downloaded)."""

    status_code = 503
    code = "model_missing"


class InvalidWeights(AlkemyError):
    """A weight file is present but does not match the architecture (missing or unexpected keys)."""

    status_code = 503
    code = "invalid_weights"


class GenerationFailed(AlkemyError):
    status_code = 422
    code = "generation_failed"


@dataclass
class ReferenceFace:
    """One reference photo of the character, as the registry analysed it."""

    image: np.ndarray  # RGB uint8, EXIF-oriented
    box: tuple[float, float, float, float]
    keypoints: np.ndarray  # (5, 2) left eye, right eye, nose, left mouth, right mouth
    embedding: np.ndarray  # unit vector of `embedder`
    embedder: str
    quality: dict = field(default_factory=dict)


@dataclass
class GenerationRequest:
    references: list[ReferenceFace]
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int | None = None  # None: the method's default
    guidance: float | None = None
    seed: int = 0
    num_images: int = 1
    params: dict = field(default_factory=dict)  # method-specific (id_weight, ip_adapter_scale, ...)
    #: secrets a remote method needs (e.g. {"gemini_api_key": ...}); never stored on the job
    credentials: dict = field(default_factory=dict, repr=False)
    #: filled by the method: metered quantities for accounting (tokens, images, ...)
    usage: dict = field(default_factory=dict)


@dataclass
class LoadOptions:
    """How to place the weights: what matters on a GPU, defaults that work on a CPU."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    compile_blocks: bool = False  # torch.compile the repeated transformer/UNet blocks
    vae_tiling: bool = False
    cpu_offload: bool = False  # model CPU offload for smaller cards

    @classmethod
    def for_device(cls, device: str | None = None, **overrides) -> LoadOptions:
        """bf16 on CUDA, fp32 on CPU."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        return cls(device=device, dtype=dtype, **overrides)


class GenerationMethod:
    key: ClassVar[str]
    #: which worker cluster runs it: "gpu" for diffusion, "default" (CPU) for remote APIs
    cluster: ClassVar[str] = "gpu"
    label: ClassVar[str]
    default_steps: ClassVar[int]
    default_guidance: ClassVar[float]
    #: the face embedder family the method's ID encoder expects ("arcface" in production)
    needs_embedder: ClassVar[str | None] = None

    @classmethod
    def load(cls, models_dir: Path, options: LoadOptions) -> GenerationMethod:
        raise NotImplementedError

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        raise NotImplementedError


def generator_for(seed: int, device: str) -> torch.Generator:
    """Seeded generator on the CPU: the same seed gives the same noise on any device."""
    return torch.Generator("cpu").manual_seed(int(seed))
