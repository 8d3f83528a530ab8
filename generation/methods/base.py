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


class EmbeddingSpaceMismatch(AlkemyError):
    """The references were embedded by another face embedder than the loaded ID encoder was trained on."""

    status_code = 422
    code = "embedding_space_mismatch"


def check_space_width(space, weights_dims: int, weights_file) -> None:
    """InvalidWeights unless the declared embedding space (`model_registry.EmbeddingSpace`) is a known
    face embedder whose width is the one the loaded ID encoder takes."""
    from characters.faces import embedder_infos

    info = embedder_infos().get(space.embedder)
    if info is None:
        raise InvalidWeights(
            f"{space.declared_by} names the face embedder '{space.embedder}', which is not one of "
            f"{', '.join(embedder_infos())}.",
            details={"file": str(weights_file), "embedder": space.embedder},
        )
    if info.dims != weights_dims:
        raise InvalidWeights(
            f"{weights_file} takes {weights_dims}-d face embeddings, but its face embedder '{space.embedder}' "
            f"(declared by {space.declared_by}) gives {info.dims}-d ones; the weights were made for another "
            "face embedder.",
            details={"file": str(weights_file), "weights_dims": weights_dims, "embedder": space.embedder,
                     "embedder_dims": info.dims},
        )  # fmt: skip


def reembed_command(character_id: int | str, embedder: str) -> str:
    return f"manage.py reembed_references --character {character_id} --embedder {embedder}"


def embedding_space_mismatch(
    *, method: str, needs: str, found: list[str], character_id: int | None = None, character_name: str = ""
) -> EmbeddingSpaceMismatch:
    """The error naming both spaces and the command that moves the character into the one needed."""
    who = f"Character '{character_name}'" if character_name else "The character"
    found_text = ", ".join(f"'{name}'" for name in sorted(set(found))) or "no embedder"
    command = reembed_command(character_id if character_id is not None else "<character id>", needs)
    return EmbeddingSpaceMismatch(
        f"{who} has reference embeddings from {found_text} only, but the loaded {method} weights take "
        f"'{needs}' embeddings (face embedders are different vector spaces). Re-embed the character's "
        f"references with that embedder: {command}",
        field="character",
        details={"method": method, "needs_embedder": needs, "reference_embedders": sorted(set(found)),
                 "command": command},
    )  # fmt: skip


@dataclass
class ReferenceFace:
    """One reference photo of the character, as the registry analysed it."""

    image: np.ndarray  # RGB uint8, EXIF-oriented
    box: tuple[float, float, float, float]
    keypoints: np.ndarray  # (5, 2) left eye, right eye, nose, left mouth, right mouth
    embedding: np.ndarray  # unit vector of `embedder`
    embedder: str
    quality: dict = field(default_factory=dict)
    #: length of the embedder's raw output: `embedding * raw_norm` is insightface's raw `embedding`, what
    #: PuLID and InstantID feed; None for dlib and for embeddings stored before raw norms were kept
    raw_norm: float | None = None


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
    #: the face embedder the method's released ID-encoder weights were trained on (None: no ID encoder)
    needs_embedder: ClassVar[str | None] = None
    #: the embedder the *loaded* weights take (their marker, else `needs_embedder`), set by `load`
    embedding_space: str | None = None

    @classmethod
    def load(cls, models_dir: Path, options: LoadOptions) -> GenerationMethod:
        raise NotImplementedError

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        raise NotImplementedError

    def check_embedding_space(self, references: list[ReferenceFace]) -> None:
        """EmbeddingSpaceMismatch unless every reference was embedded in the loaded weights' space."""
        if self.embedding_space is None:
            return
        others = [ref.embedder for ref in references if ref.embedder != self.embedding_space]
        if others:
            raise embedding_space_mismatch(method=self.key, needs=self.embedding_space, found=others)


def generator_for(seed: int, device: str) -> torch.Generator:
    """Seeded generator on the CPU: the same seed gives the same noise on any device."""
    return torch.Generator("cpu").manual_seed(int(seed))
