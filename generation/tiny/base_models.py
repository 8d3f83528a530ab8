"""Tiny FLUX.1-dev and SDXL diffusers folders (model_index.json + one folder per component)."""

from __future__ import annotations

from pathlib import Path

import torch

from generation.tiny.text import write_clip_text_model, write_clip_tokenizer, write_t5_encoder, write_t5_tokenizer

# Small enough to generate a 1024x1024 image (the production default, 28-30 steps) in seconds on a CPU:
# what stays is the production geometry (sequence lengths, packing, RoPE axes, 8x VAEs, full-size control
# images); every layer running at those sizes is as thin and as few as the architectures allow.
FLUX_JOINT_DIM = 32
FLUX_POOLED_DIM = 32
SDXL_CROSS_DIM = 64

#: Production geometry (DESIGN.md "Test models keep production geometry"): both VAEs downsample 8x, as
#: FLUX.1-dev's and SDXL's do (four blocks, three stride-2 stages; the pipelines derive `vae_scale_factor`
#: = 2 ** (blocks - 1) from this), with the real latent channels. Only the widths are small.
VAE_SCALE_FACTOR = 8
#: The decoder's last two up blocks run at 512² and 1024² (the upsampling conv of the third one too): there
#: 4 channels (the fewest the VAE's GroupNorm of 4 groups takes). The mid block has no self-attention in the
#: tiny VAEs: at 128² latents it attends over 16384 tokens, more than the whole rest of a tiny decode costs.
FLUX_VAE_CHANNELS = (4, 4, 8, 16)  # FLUX.1-dev: (128, 256, 512, 512)
FLUX_LATENT_CHANNELS = 16
SDXL_VAE_CHANNELS = (4, 4, 8, 16)  # SDXL base: (128, 256, 512, 512)
SDXL_LATENT_CHANNELS = 4
#: the real VAEs' sample_size: tiling (when enabled) starts above the same image size as in production
VAE_SAMPLE_SIZE = 1024


def flux_transformer_config() -> dict:
    """FLUX.1-dev's transformer, 1 double + 1 single block of width 32; it takes the VAE's 16 channels packed 2x2.

    At 1024² every block attends over 4096 image + 512 text tokens (FLUX.1-dev's), which is what a tiny
    step costs on a CPU, so there is one block of each kind (PuLID still gets its 2 ID cross-attentions:
    one after the double block, one after the single block, as its 1-in-2 and 1-in-4 intervals place them).
    """
    return dict(
        patch_size=1,
        in_channels=FLUX_LATENT_CHANNELS * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_JOINT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim, as FLUX.1-dev's (16, 56, 56) sums to 128
    )


def flux_vae_config() -> dict:
    """FLUX.1-dev's AutoencoderKL geometry (8x, 16 latent channels, no quant convs), narrow."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(FLUX_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(FLUX_VAE_CHANNELS),
        block_out_channels=FLUX_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=FLUX_LATENT_CHANNELS,
        norm_num_groups=4,
        mid_block_add_attention=False,
        sample_size=VAE_SAMPLE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def sdxl_vae_config() -> dict:
    """SDXL base's AutoencoderKL geometry (8x, 4 latent channels), narrow."""
    return dict(
        block_out_channels=SDXL_VAE_CHANNELS,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(SDXL_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(SDXL_VAE_CHANNELS),
        layers_per_block=1,
        latent_channels=SDXL_LATENT_CHANNELS,
        norm_num_groups=4,
        mid_block_add_attention=False,
        sample_size=VAE_SAMPLE_SIZE,
    )


def write_flux(directory: Path) -> Path:
    """A FLUX.1-dev-shaped folder: FluxTransformer2DModel, AutoencoderKL (8x, 16 latent channels), CLIP + T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**flux_transformer_config())
    torch.manual_seed(1)
    vae = AutoencoderKL(**flux_vae_config())
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        transformer=transformer,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipeline.save_pretrained(directory)
    write_clip_tokenizer(directory / "tokenizer")
    write_clip_text_model(directory / "text_encoder", hidden_size=FLUX_POOLED_DIM, seed=2)
    write_t5_tokenizer(directory / "tokenizer_2")
    write_t5_encoder(directory / "text_encoder_2", d_model=FLUX_JOINT_DIM, seed=3)
    _register_components(
        directory,
        {
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
        },
    )
    return directory


def sdxl_unet_config() -> dict:
    """diffusers' tiny SDXL UNet test configuration (text_time conditioning, two text encoders), one layer deep.

    Three levels, as SDXL base has (at 1024²: 128², 64² and 32² latents), narrow ((16, 16, 32), not
    (320, 640, 1280)) and one layer deep (one resnet and one transformer layer per block). Only the last
    level attends (SDXL's last two do): at 32x32 = 1024 tokens. An attention level at 64² (4096 tokens)
    cost most of a tiny step on a CPU, with CFG's batch of 2, in the UNet and again in IdentityNet.
    That leaves 4 attention layers in the UNet and 2 in IdentityNet, 16-dim heads as diffusers' config
    has. sample_size 128 latents is SDXL base's default of 1024 px.
    """
    return dict(
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        sample_size=VAE_SAMPLE_SIZE // VAE_SCALE_FACTOR,
        in_channels=SDXL_LATENT_CHANNELS,
        out_channels=SDXL_LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1, 2),  # heads (diffusers' legacy name): 16-dim heads, as diffusers' config has
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32 (pooled text_encoder_2)
        cross_attention_dim=SDXL_CROSS_DIM,
        norm_num_groups=8,
    )


def write_sdxl(directory: Path) -> Path:
    """An SDXL-base-shaped folder: UNet2DConditionModel, AutoencoderKL (8x, 4 latent channels), CLIP stand-ins."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sdxl_unet_config())
    torch.manual_seed(1)
    vae = AutoencoderKL(**sdxl_vae_config())
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=scheduler,
    )
    pipeline.save_pretrained(directory)
    write_clip_tokenizer(directory / "tokenizer")
    write_clip_text_model(directory / "text_encoder", hidden_size=32, seed=2)
    write_clip_tokenizer(directory / "tokenizer_2")
    write_clip_text_model(directory / "text_encoder_2", hidden_size=32, projection_dim=32, seed=3)
    _register_components(
        directory,
        {
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        },
    )
    return directory


def _register_components(directory: Path, components: dict[str, list[str]]) -> None:
    """model_index.json lists the components that were written separately, as the real folders do."""
    import json

    index_file = directory / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(components)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
