"""Character LoRA on SDXL or FLUX.1: the identity is in the LoRA weights, not in reference photos.

The base pipeline of a base model (SDXL → `StableDiffusionXLPipeline` from the `sdxl` folder, FLUX →
`FluxPipeline` from the `flux` folder) is loaded on the first job that needs it and kept warm in the method
instance; between jobs only the LoRAs change, by hot-swap (see `generation.lora.adapters` for how, and for the
rank / target-module constraints and the reload fallback). `base_loads` counts base-pipeline loads.

Request params (the job system resolves the LoraArtifact / StyleLora rows into these):
    base_model (str, required): "sdxl" | "flux"
    lora_path (str, required): the character LoRA's safetensors file
    lora_id (str): stable identifier of that file (e.g. "artifact-12"); the same id is not loaded twice.
        Default: derived from the path, size and modification time.
    lora_scale (float, 1.0): weight of the character LoRA (0 = the plain base model)
    trigger_token (str): inserted at the start of the prompt as "<token>, <prompt>" unless the prompt already
        contains it as a word (case-insensitive; CLIP lower-cases anyway), so it is never doubled.
    style_lora_path (str), style_lora_id (str), style_scale (float, 0.8): an optional style LoRA combined with
        the character LoRA (`set_adapters(["character", "style"], [lora_scale, style_scale])`).
    true_cfg (float, 1.0; FLUX only): > 1 runs FLUX's true classifier-free guidance with the negative prompt.

Every LoRA is checked with `inspect_lora` before it is loaded (cached per id), so a file that does not fit the
base fails with `invalid_lora` (422) rather than deep inside diffusers.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from pathlib import Path

import torch
from PIL import Image

from generation.lora.adapters import CHARACTER_SLOT, STYLE_SLOT, AdapterManager
from generation.lora.bases import BASES, base_spec, pipeline_class, require_base
from generation.lora.validation import LoraInfo, inspect_lora
from generation.methods.base import (
    GenerationFailed,
    GenerationMethod,
    GenerationRequest,
    LoadOptions,
    StepCallback,
    generator_for,
)

logger = logging.getLogger(__name__)

DEFAULT_LORA_SCALE = 1.0
DEFAULT_STYLE_SCALE = 0.8
#: hot-swap target rank when settings.ALKEMY_LORA_MAX_RANK is not set
DEFAULT_MAX_RANK = 128
#: LoraInfo of this many LoRA files are remembered (each a few KB)
INFO_CACHE_SIZE = 256


def with_trigger(prompt: str, token: str | None) -> str:
    """`prompt` with the trigger token in front ("<token>, <prompt>"), unless it already has it as a word."""
    token = (token or "").strip()
    if not token:
        return prompt
    if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", prompt, flags=re.IGNORECASE):
        return prompt
    return f"{token}, {prompt}" if prompt.strip() else token


class LoraMethod(GenerationMethod):
    key = "lora"
    label = "Character LoRA (SDXL / FLUX)"
    # SDXL's values; a FLUX job without steps/guidance gets FLUX's (BaseSpec.default_steps/default_guidance)
    default_steps = 30
    default_guidance = 5.0

    def __init__(self, models_dir: Path, options: LoadOptions, *, target_rank: int, max_warm_bases: int = 1):
        self.models_dir = Path(models_dir)
        self.options = options
        self.target_rank = target_rank
        #: how many base pipelines stay in memory at once (SDXL + FLUX together need ~35 GB in bf16)
        self.max_warm_bases = max(1, max_warm_bases)
        self.pipelines: dict[str, object] = {}
        self.adapters: dict[str, AdapterManager] = {}
        self.base_loads = 0
        self._infos: dict[tuple[str, str], LoraInfo] = {}

    @classmethod
    def load(cls, models_dir: Path, options: LoadOptions) -> LoraMethod:
        """Nothing heavy: each base pipeline is loaded by the first job that needs it."""
        from django.conf import settings

        return cls(
            models_dir,
            options,
            target_rank=int(getattr(settings, "ALKEMY_LORA_MAX_RANK", DEFAULT_MAX_RANK)),
            max_warm_bases=int(getattr(settings, "ALKEMY_LORA_WARM_BASES", 1)),
        )

    # -- base pipelines ---------------------------------------------------------------------------------

    def pipeline_for(self, base_model: str):
        """The warm pipeline of `base_model`, loaded on first use (ModelMissing if its files are absent)."""
        if base_model in self.pipelines:
            return self.pipelines[base_model]
        spec = base_spec(base_model)
        folder = require_base(self.models_dir, base_model)
        while len(self.pipelines) >= self.max_warm_bases:
            self._evict(next(iter(self.pipelines)))

        kwargs = {"add_watermarker": False} if base_model == "sdxl" else {}
        pipeline = pipeline_class(spec).from_pretrained(folder, dtype=self.options.dtype, **kwargs)
        pipeline.set_progress_bar_config(disable=True)
        if self.options.vae_tiling:
            pipeline.vae.enable_tiling()
        if self.options.cpu_offload:
            pipeline.enable_model_cpu_offload(device=self.options.device)
        else:
            pipeline.to(self.options.device)
        self.pipelines[base_model] = pipeline
        self.adapters[base_model] = AdapterManager(
            pipeline, spec, target_rank=self.target_rank, compile_blocks=self.options.compile_blocks
        )
        self.base_loads += 1
        return pipeline

    def _evict(self, base_model: str) -> None:
        logger.info("Unloading the %s pipeline to make room", base_model)
        self.pipelines.pop(base_model)
        self.adapters.pop(base_model)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- LoRAs ------------------------------------------------------------------------------------------

    def lora_info(self, base_model: str, lora_id: str, path: Path) -> LoraInfo:
        """`inspect_lora` of the file, remembered per (base, id): the same file is not re-read every job."""
        key = (base_model, lora_id)
        if key not in self._infos:
            if len(self._infos) >= INFO_CACHE_SIZE:
                self._infos.pop(next(iter(self._infos)))
            self._infos[key] = inspect_lora(path, base_model, self.models_dir)
        return self._infos[key]

    def _lora_file(self, params: dict, path_key: str, id_key: str) -> tuple[Path, str]:
        raw = params.get(path_key)
        if not raw:
            raise GenerationFailed(f"The LoRA method needs params.{path_key}.", field="params")
        path = Path(raw)
        if not path.is_file():
            raise GenerationFailed(f"The LoRA file {path} does not exist.", field="params", details={path_key: raw})
        lora_id = params.get(id_key)
        if not lora_id:
            stat = path.stat()
            lora_id = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        return path, str(lora_id)

    def prepare_adapters(self, params: dict) -> AdapterManager:
        """Load or hot-swap the request's LoRAs into the warm pipeline and set their weights."""
        base_model = params.get("base_model")
        if base_model not in BASES:
            raise GenerationFailed(
                f"params.base_model must be one of {', '.join(BASES)}, not {base_model!r}.", field="params"
            )
        path, lora_id = self._lora_file(params, "lora_path", "lora_id")
        info = self.lora_info(base_model, lora_id, path)
        style = None
        if params.get("style_lora_path"):
            style_path, style_id = self._lora_file(params, "style_lora_path", "style_lora_id")
            style = (style_path, style_id, self.lora_info(base_model, style_id, style_path))

        self.pipeline_for(base_model)
        adapters = self.adapters[base_model]
        adapters.ensure(CHARACTER_SLOT, lora_id, path, info)
        weights = {CHARACTER_SLOT: float(params.get("lora_scale", DEFAULT_LORA_SCALE))}
        if style is not None:
            adapters.ensure(STYLE_SLOT, style[1], style[0], style[2])
            weights[STYLE_SLOT] = float(params.get("style_scale", DEFAULT_STYLE_SCALE))
        adapters.activate(weights)
        return adapters

    # -- generation -------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        """`request.num_images` images of exactly width × height; `on_step(step, total)` after each step."""
        params = request.params
        adapters = self.prepare_adapters(params)
        spec = adapters.spec
        pipeline = adapters.pipeline
        steps = request.steps or spec.default_steps
        guidance = spec.default_guidance if request.guidance is None else float(request.guidance)
        prompt = with_trigger(request.prompt, params.get("trigger_token"))

        # The VAE (and FLUX's 2x2 latent packing) work in multiples, and the SDXL pipeline insists on multiples
        # of 8: generate slightly larger, then centre-crop.
        multiple = pipeline.vae_scale_factor * 2 if spec.key == "flux" else math.lcm(8, pipeline.vae_scale_factor)
        width, height = request.width, request.height
        gen_width, gen_height = -(-width // multiple) * multiple, -(-height // multiple) * multiple

        def step_end(pipe, index, timestep, callback_kwargs):
            if on_step is not None:
                on_step(index + 1, steps)
            return {}

        kwargs = dict(
            prompt=prompt,
            width=gen_width,
            height=gen_height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=request.num_images,
            generator=generator_for(request.seed, self.options.device),
            callback_on_step_end=step_end,
        )
        if spec.key == "flux":
            true_cfg = float(params.get("true_cfg", 1.0))
            kwargs.update(true_cfg_scale=true_cfg, negative_prompt=request.negative_prompt if true_cfg > 1 else None)
        else:
            # None, not "": SDXL then uses zero embeddings for the negative branch, as it was trained.
            kwargs.update(negative_prompt=request.negative_prompt or None)
        images = pipeline(**kwargs).images

        if (gen_width, gen_height) != (width, height):
            left, top = (gen_width - width) // 2, (gen_height - height) // 2
            images = [image.crop((left, top, left + width, top + height)) for image in images]
        return images
