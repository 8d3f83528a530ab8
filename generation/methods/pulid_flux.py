"""PuLID-FLUX: identity from ID tokens that FLUX.1-dev's image stream cross-attends to.

PuLID (https://arxiv.org/abs/2404.16022) on diffusers' stock `FluxPipeline`:

1. **ID tokens** (`generation.pulid.id_encoder`): the reference photo is aligned to the 512-px FFHQ
   template from its 5 keypoints, BiSeNet keeps the face (in grey, background white), EVA02-CLIP-L
   gives an embedding and 5 intermediate hidden states; the IDFormer turns those plus the face
   embedding (ArcFace in production) into 32 ID tokens of 2048 dims.
2. **Cross-attention** (`generation.pulid.flux_hooks`): 20 `PerceiverAttentionCA` modules, registered
   as `transformer.pulid_ca`, add `id_weight * ca(id_tokens, image_tokens)` to the image stream after
   every 2nd double block and every 4th single block, through forward hooks.

Request params:
    id_weight (float, 1.0): strength of the ID injection; 0 gives plain FLUX.
    start_step (int, 0): first denoising step that gets the ID (earlier steps fix the layout freely).
    true_cfg (float, 1.0): > 1 turns on true CFG: a second pass with the negative prompt and the
        unconditional ID (IDFormer of zeros), combined as neg + true_cfg * (pos - neg). PuLID
        recommends guidance ~1 with it.
    id_mix ("mean"): how several references combine, "mean" or "concat" of their ID tokens
        (see `generation.pulid.id_encoder`).
    id_embedding_norm (float; default sqrt(embedding dims)): length the unit face embeddings are scaled
        to. PuLID feeds insightface's raw ArcFace `embedding`, whose length is about sqrt(512); the
        registry stores unit vectors, so the direction is given that typical length back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from generation.methods.base import (
    GenerationFailed,
    GenerationMethod,
    GenerationRequest,
    LoadOptions,
    ReferenceFace,
    StepCallback,
    generator_for,
)
from generation.model_registry import component_path, require
from generation.pulid.flux_hooks import IdInjection, attach_pulid
from generation.pulid.id_encoder import ID_MIX_MODES, PulidIdEncoder
from generation.pulid.weights import load_bisenet, load_eva_clip, load_pulid


def scaled_references(references: list[ReferenceFace], norm: float | None) -> list[ReferenceFace]:
    """The references with their unit embeddings rescaled to `norm` (default sqrt(dims), see the module docstring)."""
    scaled = []
    for reference in references:
        vector = np.asarray(reference.embedding, dtype=np.float32).reshape(-1)
        length = float(np.linalg.norm(vector)) or 1.0
        target = math.sqrt(vector.size) if norm is None else float(norm)
        scaled.append(dataclasses.replace(reference, embedding=vector / length * target))
    return scaled


class PulidFluxMethod(GenerationMethod):
    key = "pulid_flux"
    label = "PuLID-FLUX"
    default_steps = 28
    default_guidance = 3.5
    needs_embedder = "arcface"

    def __init__(self, pipeline, id_encoder: PulidIdEncoder, injection: IdInjection, options: LoadOptions):
        self.pipeline = pipeline
        self.id_encoder = id_encoder
        self.injection = injection
        self.options = options

    @classmethod
    def load(cls, models_dir: Path, options: LoadOptions | None = None) -> PulidFluxMethod:
        """FLUX.1-dev + PuLID weights from `models_dir`, strictly; hooks attached, then placed per `options`."""
        from diffusers import FluxPipeline

        options = options or LoadOptions()
        require(models_dir, "pulid_flux")
        parser = load_bisenet(component_path(models_dir, "face_parsing"))
        eva = load_eva_clip(component_path(models_dir, "eva_clip"))
        pipeline = FluxPipeline.from_pretrained(component_path(models_dir, "flux"), dtype=options.dtype)
        transformer = pipeline.transformer
        idformer, ca_modules = load_pulid(
            component_path(models_dir, "pulid_flux_weights"),
            transformer_dim=transformer.config.num_attention_heads * transformer.config.attention_head_dim,
            num_double=len(transformer.transformer_blocks),
            num_single=len(transformer.single_transformer_blocks),
            eva=eva,
        )
        injection = IdInjection()
        attach_pulid(transformer, ca_modules.to(options.dtype), injection)

        # EVA-CLIP and the IDFormer run in the pipeline's dtype (bf16 on CUDA, as PuLID does);
        # the small BiSeNet stays in fp32 like facexlib's.
        id_encoder = PulidIdEncoder(parser, eva.to(options.dtype), idformer.to(options.dtype))
        if options.cpu_offload:
            pipeline.enable_model_cpu_offload(device=options.device)
        else:
            pipeline.to(options.device)
            id_encoder.to(options.device)
        if options.vae_tiling:
            pipeline.vae.enable_tiling()
        if options.compile_blocks:
            # After the hooks: each compiled block includes its PuLID cross-attention.
            for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
                block.compile()
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, id_encoder, injection, options)

    @contextlib.contextmanager
    def _encoders_on_device(self):
        """With model CPU offload the face encoders wait on the CPU and visit the GPU only to encode."""
        if self.options.cpu_offload:
            self.id_encoder.to(self.options.device)
        try:
            yield
        finally:
            if self.options.cpu_offload:
                self.id_encoder.to("cpu")

    def id_tokens(self, request: GenerationRequest, with_unconditional: bool) -> list[torch.Tensor]:
        """[ID tokens of the references] (+ [unconditional ID tokens] for true CFG)."""
        params = request.params
        mode = str(params.get("id_mix", "mean"))
        if mode not in ID_MIX_MODES:
            raise GenerationFailed(f"id_mix must be one of {', '.join(ID_MIX_MODES)}.", field="params")
        embedders = {reference.embedder for reference in request.references}
        if len(embedders) > 1:
            raise GenerationFailed(
                f"The references were analysed by different face embedders ({', '.join(embedders)})."
            )
        references = scaled_references(request.references, params.get("id_embedding_norm"))
        with self._encoders_on_device():
            tokens = [self.id_encoder.encode_all(references, mode)]
            if with_unconditional:
                tokens.append(self.id_encoder.unconditional())
        return tokens

    @torch.inference_mode()
    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        """`request.num_images` images of exactly width × height; `on_step(step, total)` after each step."""
        if not request.references:
            raise GenerationFailed("PuLID-FLUX needs at least one reference face.")
        params = request.params
        steps = request.steps or self.default_steps
        guidance = self.default_guidance if request.guidance is None else float(request.guidance)
        id_weight = float(params.get("id_weight", 1.0))
        start_step = int(params.get("start_step", 0))
        true_cfg = float(params.get("true_cfg", 1.0))
        use_true_cfg = true_cfg > 1.0  # FluxPipeline's own condition for the negative pass

        tokens = self.id_tokens(request, use_true_cfg) if id_weight != 0 else []

        # FLUX packs 2x2 latent patches: generate in multiples of that, then centre-crop.
        multiple = self.pipeline.vae_scale_factor * 2
        width, height = request.width, request.height
        gen_width, gen_height = -(-width // multiple) * multiple, -(-height // multiple) * multiple

        def step_end(pipeline, index, timestep, callback_kwargs):
            self.injection.step_done()
            if on_step is not None:
                on_step(index + 1, steps)
            return {}

        self.injection.reset(tokens, weight=id_weight, start_step=start_step)
        try:
            images = self.pipeline(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt if use_true_cfg else None,
                true_cfg_scale=true_cfg,
                width=gen_width,
                height=gen_height,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=request.num_images,
                generator=generator_for(request.seed, self.options.device),
                callback_on_step_end=step_end,
            ).images
        finally:
            self.injection.reset()

        if (gen_width, gen_height) != (width, height):
            left, top = (gen_width - width) // 2, (gen_height - height) // 2
            images = [image.crop((left, top, left + width, top + height)) for image in images]
        return images
