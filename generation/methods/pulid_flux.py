"""PuLID-FLUX: identity from ID tokens that FLUX.1-dev's image stream cross-attends to.

PuLID (https://arxiv.org/abs/2404.16022) on diffusers' stock `FluxPipeline`:

1. **ID tokens** (`generation.pulid.id_encoder`): the reference photo is aligned to the 512-px FFHQ
   template from its 5 keypoints, BiSeNet keeps the face (in grey, background white), EVA02-CLIP-L
   gives an embedding and 5 intermediate hidden states; the IDFormer turns those plus the face
   embedding (ArcFace in production) into 32 ID tokens of 2048 dims.
2. **Cross-attention** (`generation.pulid.flux_hooks`): 20 `PerceiverAttentionCA` modules, registered
   as `transformer.pulid_ca`, add `id_weight * ca(id_tokens, image_tokens)` to the image stream after
   every 2nd double block and every 4th single block, through forward hooks.

Request params (names and defaults are those of PuLID's FLUX demo, `app_flux.py`):
    id_weight (float, 1.0): strength of the ID injection; 0 gives plain FLUX.
    start_step (int, 0): first denoising step that gets the ID (earlier steps fix the layout freely).
    true_cfg (float, 1.0): true CFG is on when it differs from 1 by more than 0.01 (PuLID's test, so
        values below 1 count too): a second pass with the negative prompt and the unconditional ID
        (IDFormer of zeros), combined as neg + true_cfg * (pos - neg). PuLID recommends guidance ~1
        with it. Without a negative prompt the demo's (`DEMO_NEGATIVE_PROMPT`) is used.
    timestep_to_start_cfg (int, 1): first step with the negative pass. PuLID's sampler skips it on
        step 0; 0 runs it on every step (diffusers' FluxPipeline does that).
    max_sequence_length (int, 128): T5 prompt tokens, PuLID's default (FluxPipeline's is 512).
    id_mix ("mean"): how several references combine, "mean" or "concat" of their ID tokens
        (see `generation.pulid.id_encoder`). An extension: PuLID-FLUX takes one ID image; with one
        reference both modes are exactly that.
    id_embedding_norm (float; default: each reference's raw length): length the face embeddings are
        scaled to. PuLID feeds insightface's raw ArcFace `embedding`; the registry stores the unit
        vector and its raw length (`ReferenceFace.raw_norm`), so by default the raw embedding is fed
        exactly. Where no raw length is stored (dlib, embeddings enrolled before raw norms were kept)
        the typical ArcFace length sqrt(dims) is used.

The weights take the embeddings of one face embedder (antelopev2 for the released file, or what a
marker beside them declares, `model_registry.embedding_space`); references from another embedder
are refused with `embedding_space_mismatch`.

Guidance defaults to 4.0, the demo's and the sampler's default.

The denoising loop is written out (rather than calling `FluxPipeline`) because PuLID's true CFG
differs from diffusers' (the start step, the enabling test); every other piece is FluxPipeline's
own helper, so with id_weight 0 and true CFG off the result is FluxPipeline's, bit for bit.
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
    check_space_width,
    generator_for,
)
from generation.model_registry import PRODUCTION_EMBEDDER, component_path, embedding_space, require
from generation.pulid.flux_hooks import IdInjection, attach_pulid
from generation.pulid.id_encoder import ID_MIX_MODES, PulidIdEncoder
from generation.pulid.weights import load_bisenet, load_eva_clip, load_pulid

#: PuLID's FLUX demo and sampler default (`app_flux.py`, `flux/sampling.py` `denoise`)
DEFAULT_GUIDANCE = 4.0
#: the demo encodes prompts with 128 T5 tokens (`load_t5(max_length=128)`; FluxPipeline defaults to 512)
DEFAULT_MAX_SEQUENCE_LENGTH = 128
MAX_T5_SEQUENCE_LENGTH = 512
#: PuLID's sampler runs the true-CFG negative pass from step 1 on (`timestep_to_start_cfg=1`)
DEFAULT_CFG_START_STEP = 1
#: the demo's negative prompt, used when true CFG is on and the request has none
DEMO_NEGATIVE_PROMPT = "bad quality, worst quality, text, signature, watermark, extra limbs"


def true_cfg_enabled(true_cfg: float) -> bool:
    """PuLID's test: true CFG runs when the scale differs from 1 by more than 0.01 (also below 1)."""
    return abs(true_cfg - 1.0) > 1e-2


def int_param(params: dict, name: str, default: int, *, low: int, high: int | None = None) -> int:
    """`params[name]` as an int within [low, high], or a GenerationFailed naming it."""
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise GenerationFailed(f"{name} must be an integer {bounds}.", field="params", details={"param": name})
    return value


def scaled_references(references: list[ReferenceFace], norm: float | None) -> list[ReferenceFace]:
    """The references with their embeddings at length `norm`; by default their raw length (the raw
    embedding PuLID feeds), else sqrt(dims) (see the module docstring)."""
    scaled = []
    for reference in references:
        vector = np.asarray(reference.embedding, dtype=np.float32).reshape(-1)
        length = float(np.linalg.norm(vector)) or 1.0
        if norm is not None:
            target = float(norm)
        elif reference.raw_norm is not None:
            target = float(reference.raw_norm)
        else:
            target = math.sqrt(vector.size)
        scaled.append(dataclasses.replace(reference, embedding=vector / length * target))
    return scaled


class PulidFluxMethod(GenerationMethod):
    key = "pulid_flux"
    label = "PuLID-FLUX"
    default_steps = 28
    default_guidance = DEFAULT_GUIDANCE
    needs_embedder = PRODUCTION_EMBEDDER

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
        space = embedding_space(models_dir, cls.key)
        check_space_width(space, id_encoder.face_embedding_dim, component_path(models_dir, "pulid_flux_weights"))
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
        method = cls(pipeline, id_encoder, injection, options)
        method.embedding_space = space.embedder
        return method

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
        self.check_embedding_space(request.references)
        params = request.params
        steps = request.steps or self.default_steps
        guidance = self.default_guidance if request.guidance is None else float(request.guidance)
        id_weight = float(params.get("id_weight", 1.0))
        start_step = int(params.get("start_step", 0))
        true_cfg = float(params.get("true_cfg", 1.0))
        cfg_start = int_param(params, "timestep_to_start_cfg", DEFAULT_CFG_START_STEP, low=0)
        max_sequence_length = int_param(
            params, "max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH, low=1, high=MAX_T5_SEQUENCE_LENGTH
        )
        use_true_cfg = true_cfg_enabled(true_cfg)
        negative_prompt = (request.negative_prompt or DEMO_NEGATIVE_PROMPT) if use_true_cfg else None

        tokens = self.id_tokens(request, use_true_cfg) if id_weight != 0 else []

        # FLUX packs 2x2 latent patches: generate in multiples of that, then centre-crop.
        multiple = self.pipeline.vae_scale_factor * 2
        width, height = request.width, request.height
        gen_width, gen_height = -(-width // multiple) * multiple, -(-height // multiple) * multiple

        self.injection.reset(tokens, weight=id_weight, start_step=start_step)
        try:
            images = self._denoise(
                request,
                negative_prompt=negative_prompt,
                width=gen_width,
                height=gen_height,
                steps=steps,
                guidance=guidance,
                true_cfg=true_cfg,
                cfg_start=cfg_start,
                max_sequence_length=max_sequence_length,
                on_step=on_step,
            )
        finally:
            self.injection.reset()

        if (gen_width, gen_height) != (width, height):
            left, top = (gen_width - width) // 2, (gen_height - height) // 2
            images = [image.crop((left, top, left + width, top + height)) for image in images]
        return images

    def _denoise(
        self,
        request: GenerationRequest,
        *,
        negative_prompt: str | None,
        width: int,
        height: int,
        steps: int,
        guidance: float,
        true_cfg: float,
        cfg_start: int,
        max_sequence_length: int,
        on_step: StepCallback | None,
    ) -> list[Image.Image]:
        """FluxPipeline's encode → latents → schedule → loop → decode, with PuLID's true-CFG rule.

        `negative_prompt` None means no true CFG. The ID hooks read `self.injection`: the first
        transformer call of a step is the conditional pass, a second one the negative pass.
        """
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
        from diffusers.utils.torch_utils import get_module_execution_device

        pipe = self.pipeline
        transformer = pipe.transformer
        device = pipe._execution_device
        count = request.num_images
        generator = generator_for(request.seed, self.options.device)

        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=request.prompt,
            prompt_2=None,
            device=device,
            num_images_per_prompt=count,
            max_sequence_length=max_sequence_length,
        )
        if negative_prompt is not None:
            negative_embeds, negative_pooled, negative_text_ids = pipe.encode_prompt(
                prompt=negative_prompt,
                prompt_2=None,
                device=device,
                num_images_per_prompt=count,
                max_sequence_length=max_sequence_length,
            )

        latents, image_ids = pipe.prepare_latents(
            count, transformer.config.in_channels // 4, height, width, prompt_embeds.dtype, device, generator
        )
        config = pipe.scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
        guidance_vector = None
        if transformer.config.guidance_embeds:
            guidance_vector = torch.full([1], guidance, device=device, dtype=torch.float32).expand(latents.shape[0])

        pipe.scheduler.set_begin_index(0)
        for index, t in enumerate(timesteps):
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            with transformer.cache_context("cond"):
                noise = transformer(
                    hidden_states=latents,
                    timestep=timestep,
                    guidance=guidance_vector,
                    pooled_projections=pooled,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=image_ids,
                    return_dict=False,
                )[0]
            # PuLID's sampler starts the negative pass at `timestep_to_start_cfg` (1 by default):
            # the first step, which sets the layout, follows the distilled guidance alone.
            if negative_prompt is not None and index >= cfg_start:
                with transformer.cache_context("uncond"):
                    negative_noise = transformer(
                        hidden_states=latents,
                        timestep=timestep,
                        guidance=guidance_vector,
                        pooled_projections=negative_pooled,
                        encoder_hidden_states=negative_embeds,
                        txt_ids=negative_text_ids,
                        img_ids=image_ids,
                        return_dict=False,
                    )[0]
                noise = negative_noise + true_cfg * (noise - negative_noise)
            latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
            self.injection.step_done()
            if on_step is not None:
                on_step(index + 1, len(timesteps))

        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
        pipe.maybe_free_model_hooks()
        return images
