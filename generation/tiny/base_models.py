"""Tiny FLUX.1-dev and SDXL diffusers folders (model_index.json + one folder per component)."""

from __future__ import annotations

from pathlib import Path

import torch

from generation.tiny.text import write_clip_text_model, write_clip_tokenizer, write_t5_encoder, write_t5_tokenizer

# Small enough to denoise a 64x64 image in well under a second on a laptop CPU.
FLUX_JOINT_DIM = 32
FLUX_POOLED_DIM = 32
SDXL_CROSS_DIM = 64


def write_flux(directory: Path) -> Path:
    """A FLUX.1-dev-shaped folder: FluxTransformer2DModel, AutoencoderKL (16 latent channels), CLIP + T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_JOINT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
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
    """diffusers' tiny SDXL UNet test configuration (text_time conditioning, two text encoders)."""
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32 (pooled text_encoder_2)
        cross_attention_dim=SDXL_CROSS_DIM,
        norm_num_groups=32,
    )


def write_sdxl(directory: Path) -> Path:
    """An SDXL-base-shaped folder: UNet2DConditionModel, AutoencoderKL, CLIP-L + OpenCLIP-bigG stand-ins."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sdxl_unet_config())
    torch.manual_seed(1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=128,
    )
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
