"""FLUX.1-dev LoRA trainer: the transformer learns the character by flow matching.

1. Load the FLUX pipeline from its diffusers folder (base frozen, bf16 on CUDA, fp32 on CPU).
2. Encode every example once: VAE latents, shifted and scaled as FLUX expects and packed into 2×2 patches
   with their position ids, and per caption the T5 token embeddings (512 tokens, as at inference), CLIP's
   pooled embedding and the text position ids; then the VAE and both text encoders are dropped, so a step
   is transformer work only.
3. LoRA on the attention projections of every block, the double blocks' context projections included
   (`to_q/to_k/to_v/to_out.0`, `add_q_proj/add_k_proj/add_v_proj/to_add_out`).
4. One step's loss: σ from a logit-normal, shifted for the image's token count exactly as FLUX's scheduler
   shifts its inference sigmas (μ from `calculate_shift`), x_σ = (1−σ)·x₀ + σ·ε, the transformer predicts the
   velocity ε − x₀ given σ and the guidance embedding (FLUX.1-dev is guidance-distilled; we train at the
   guidance generations use); mean squared error in fp32.
"""

from __future__ import annotations

import gc
import math

import torch
import torch.nn.functional as F

from training.trainer.loop import TrainingConfig, add_lora

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
TEXT_TOKENS = 512
#: the guidance the LoRA method renders FLUX with by default (BaseSpec.default_guidance)
GUIDANCE = 3.5


class FluxTrainer:
    base_model = "flux"
    target_modules = TARGET_MODULES

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.pipeline = None
        self.denoiser = None
        self.latents: list[torch.Tensor] = []
        self.texts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @property
    def num_examples(self) -> int:
        return len(self.latents)

    def load(self, **components) -> None:
        """The pipeline from the models dir; `components` replace folders (benchmarks hand in a random transformer)."""
        from diffusers import FluxPipeline

        from generation.lora.bases import require_base

        folder = require_base(self.config.models_dir, "flux")
        pipeline = FluxPipeline.from_pretrained(folder, dtype=self.config.dtype, **components)
        self.pipeline = pipeline.to(self.config.device)
        self.denoiser = self.pipeline.transformer

    @torch.no_grad()
    def cache(self, examples: list) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        device, dtype, pipeline = self.config.device, self.config.dtype, self.pipeline
        vae = pipeline.vae
        self.latents = []
        for example in examples:
            pixels = pipeline.image_processor.preprocess(example.image).to(device, vae.dtype)
            latents = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
            batch, channels, height, width = latents.shape
            self.latents.append(pipeline._pack_latents(latents.float(), batch, channels, height, width))
        self.image_ids = pipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)

        by_caption = {}
        for caption in dict.fromkeys(example.caption for example in examples):
            embeds, pooled, text_ids = pipeline.encode_prompt(
                caption, prompt_2=None, device=device, max_sequence_length=TEXT_TOKENS
            )
            by_caption[caption] = (embeds.to(dtype), pooled.to(dtype), text_ids.to(dtype))
        self.texts = [by_caption[example.caption] for example in examples]

        # The sigma shift of FLUX's scheduler for this many image tokens (static `shift` when not dynamic).
        scheduler = pipeline.scheduler.config
        if scheduler.get("use_dynamic_shifting"):
            tokens = self.latents[0].shape[1]
            self.mu = calculate_shift(
                tokens, scheduler.base_image_seq_len, scheduler.max_image_seq_len, scheduler.base_shift,
                scheduler.max_shift,
            )  # fmt: skip
        else:
            self.mu = math.log(scheduler.shift)
        use_guidance = self.denoiser.config.guidance_embeds
        self.guidance = torch.full((1,), GUIDANCE, device=device, dtype=torch.float32) if use_guidance else None

        self.pipeline = None  # only the transformer stays on the device
        gc.collect()
        if self.config.on_cuda:
            torch.cuda.empty_cache()

    def add_lora(self) -> None:
        add_lora(self.denoiser, self.config, self.target_modules)

    def loss(self, index: int, generator: torch.Generator) -> torch.Tensor:
        device, dtype = self.config.device, self.config.dtype
        x0 = self.latents[index]
        prompt_embeds, pooled, text_ids = self.texts[index]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        u = torch.sigmoid(torch.randn((1,), generator=generator, device=device))
        sigma = math.exp(self.mu) / (math.exp(self.mu) + (1 / u - 1))
        noisy = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise

        prediction = self.denoiser(
            hidden_states=noisy.to(dtype),
            timestep=sigma.to(dtype),  # the transformer scales σ (and the guidance) by 1000 itself
            guidance=self.guidance,
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=self.image_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(prediction.float(), noise - x0)
