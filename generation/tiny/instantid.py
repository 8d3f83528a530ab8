"""Tiny InstantID weights: IdentityNet ControlNet folder and ip-adapter.bin, for the tiny SDXL of base_models.

Same files, classes and state-dict keys as InstantX/InstantID; only the widths are small. The
Resampler takes embeddings of one face embedder (the active one by default; declared in
`instantid/embedding_space.json`) and makes ID tokens of the tiny UNet's cross-attention width.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from generation.instantid.attention import install_ip_processors
from generation.instantid.resampler import Resampler
from generation.model_registry import component_path, write_embedding_space
from generation.tiny.base_models import SDXL_CROSS_DIM, SDXL_VAE_CHANNELS, sdxl_unet_config

#: IdentityNet's condition encoder brings the control image (full output size) down to the latent grid:
#: one stride-2 stage per VAE downsampling (3 for SDXL's 8x, as InstantID's (16, 32, 96, 256) has).
CONDITIONING_CHANNELS = tuple(2 * 2**stage for stage in range(len(SDXL_VAE_CHANNELS)))  # (2, 4, 8, 16)


def tiny_resampler(embedder_dims: int) -> Resampler:
    """InstantID's Resampler at test size (dim_head stays 64, as in the release, so loading can infer heads)."""
    return Resampler(
        dim=64, depth=2, dim_head=64, heads=2, num_queries=16, embedding_dim=embedder_dims, output_dim=SDXL_CROSS_DIM
    )


def write_instantid_components(
    models_dir: Path, *, embedder_dims: int | None = None, embedder: str | None = None
) -> None:
    """Write `instantid/ControlNetModel/` and `instantid/ip-adapter.bin` under `models_dir`.

    Matches the tiny SDXL that `write_sdxl(models_dir / "stable-diffusion-xl-base-1.0")` writes. The
    Resampler takes `embedder`'s embeddings (default: the active face embedder), `embedder_dims` wide
    (default: that embedder's width), and `instantid/embedding_space.json` declares the embedder.
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    from generation.tiny.build import embedding_space_for

    embedder, embedder_dims = embedding_space_for(embedder, embedder_dims)
    write_embedding_space(models_dir, "instantid_sdxl", embedder)

    torch.manual_seed(0)  # the same UNet weights write_sdxl saves: IdentityNet starts as a copy of the UNet
    unet = UNet2DConditionModel(**sdxl_unet_config())
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    # ControlNet's output convolutions start at zero; a "trained" tiny one must actually steer the UNet.
    torch.manual_seed(5)
    for module in [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks]:
        nn.init.normal_(module.weight, std=0.05)
    nn.init.normal_(controlnet.controlnet_mid_block.weight, std=0.05)
    controlnet.save_pretrained(component_path(models_dir, "instantid_controlnet"))

    torch.manual_seed(6)
    resampler = tiny_resampler(embedder_dims)
    processors = install_ip_processors(unet, cross_attention_dim=SDXL_CROSS_DIM, num_tokens=16)
    adapter = component_path(models_dir, "instantid_ip_adapter")
    adapter.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": processors.state_dict()}, adapter)
