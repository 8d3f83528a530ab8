"""SDXL LoRA trainer: the UNet learns the character; epsilon (or v) prediction on SDXL's DDPM noise schedule.

1. Load the SDXL pipeline from its diffusers folder (base frozen, bf16 on CUDA, fp32 on CPU).
2. Encode every example once: VAE latents (the VAE in fp32, as SDXL's VAE needs) and both CLIP text
   encoders' embeddings + pooled embedding per caption; then the VAE and text encoders are dropped, so a
   step is UNet work only.
3. LoRA on the attention projections of the UNet (`to_q/to_k/to_v/to_out.0`).
4. One step's loss: a random timestep of the 1000 DDPM steps, x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, the UNet predicts ε
   (or v = √ᾱ·ε − √(1−ᾱ)·x₀ when the scheduler says v_prediction), conditioned on the text embeddings and
   SDXL's micro-conditioning time ids; mean squared error in fp32.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from training.trainer.loop import TrainingConfig, add_lora

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class SDXLTrainer:
    base_model = "sdxl"
    target_modules = TARGET_MODULES

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.pipeline = None
        self.denoiser = None
        self.latents: list[torch.Tensor] = []
        self.texts: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def num_examples(self) -> int:
        return len(self.latents)

    def load(self, **components) -> None:
        """The pipeline from the models dir; `components` replace folders (benchmarks hand in a random UNet)."""
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline

        from generation.lora.bases import require_base

        folder = require_base(self.config.models_dir, "sdxl")
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            folder, dtype=self.config.dtype, add_watermarker=False, **components
        )
        self.pipeline = pipeline.to(self.config.device)
        self.denoiser = pipeline.unet
        # the training noise schedule is DDPM's over the betas the base was trained with
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.prediction_type = scheduler.config.prediction_type
        self.num_train_timesteps = scheduler.config.num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.config.device, torch.float32)

    @torch.no_grad()
    def cache(self, examples: list) -> None:
        device, pipeline = self.config.device, self.pipeline
        vae = pipeline.vae
        if vae.config.force_upcast:  # SDXL's VAE overflows in half precision
            vae.to(dtype=torch.float32)
        self.latents = []
        for example in examples:
            pixels = pipeline.image_processor.preprocess(example.image).to(device, vae.dtype)
            self.latents.append(vae.encode(pixels).latent_dist.mode().float() * vae.config.scaling_factor)

        by_caption = {}
        for caption in dict.fromkeys(example.caption for example in examples):
            embeds, _, pooled, _ = pipeline.encode_prompt(caption, device=device, do_classifier_free_guidance=False)
            by_caption[caption] = (embeds.to(self.config.dtype), pooled.to(self.config.dtype))
        self.texts = [by_caption[example.caption] for example in examples]

        # SDXL's micro-conditioning (original size, crop top-left, target size): the crops are square photos
        # at the training size, as generations at that size will ask for.
        size = self.config.resolution
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=self.config.dtype)

        self.pipeline = None  # only the UNet stays on the device
        gc.collect()
        if self.config.on_cuda:
            torch.cuda.empty_cache()

    def add_lora(self) -> None:
        add_lora(self.denoiser, self.config, self.target_modules)

    def loss(self, index: int, generator: torch.Generator) -> torch.Tensor:
        device = self.config.device
        x0 = self.latents[index]
        prompt_embeds, pooled = self.texts[index]
        noise = torch.randn(x0.shape, generator=generator, device=device)
        timestep = torch.randint(0, self.num_train_timesteps, (1,), generator=generator, device=device)
        alpha_bar = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

        prediction = self.denoiser(
            noisy.to(self.config.dtype),
            timestep,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids},
            return_dict=False,
        )[0]
        if self.prediction_type == "v_prediction":
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
        else:
            target = noise
        return F.mse_loss(prediction.float(), target)
