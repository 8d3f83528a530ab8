"""Tiny PuLID-FLUX components: IDFormer + cross-attentions, EVA02-CLIP vision tower, BiSeNet parser.

Real classes and real key names, small sizes; the loaders read every size back from the shapes.
The cross-attentions fit the tiny FLUX transformer of `base_models.write_flux` (inner dim 32,
2 double + 4 single blocks → 1 + 1 modules) and the IDFormer takes `embedder_dims` + the tiny
EVA embedding, so the real loading, alignment, parsing and injection code runs on CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generation.model_registry import component_path

# The tiny FLUX transformer of base_models.write_flux: 2 heads x 16 dims, 2 double + 4 single blocks.
TINY_FLUX_INNER_DIM = 32
TINY_FLUX_NUM_CA = 2  # ceil(2 / 2) + ceil(4 / 4)

TINY_EVA = dict(image_size=56, patch_size=14, width=64, depth=6, num_heads=1, mlp_dim=170, embed_dim=32)
TINY_IDFORMER = dict(dim=32, depth=5, dim_head=32, heads=1, num_id_token=5, num_queries=8, output_dim=16, ff_mult=2)
TINY_IDFORMER_MAPPING_DIM = 32
TINY_BISENET_WIDTH = 8


def write_eva_clip(path: Path, seed: int = 10) -> Path:
    """`EVA02_CLIP_L_336_psz14_s6B.pt`-shaped: `visual.*` of a tiny tower plus text-tower keys to ignore."""
    from generation.pulid.eva_clip import EvaVisionTransformer

    torch.manual_seed(seed)
    model = EvaVisionTransformer(**TINY_EVA)
    for name, param in model.named_parameters():  # zeros-initialised tokens would hide bugs
        if name in ("cls_token", "pos_embed") or name.endswith(("q_bias", "v_bias")):
            torch.nn.init.normal_(param, std=0.02)
    state = {f"visual.{k}": v.clone() for k, v in model.state_dict().items()}
    # The full CLIP checkpoint also holds the text tower; the loader must ignore it.
    state["text.positional_embedding"] = torch.zeros(4, 8)
    state["text.token_embedding.weight"] = torch.zeros(16, 8)
    state["logit_scale"] = torch.tensor(4.6)
    # eva_clip checkpoints can carry the (derived) rotary tables; the loader drops them.
    state["visual.rope.freqs_cos"] = model.rope.freqs_cos.clone()
    state["visual.rope.freqs_sin"] = model.rope.freqs_sin.clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def write_bisenet(path: Path, seed: int = 11) -> Path:
    """facexlib `parsing_bisenet.pth`-shaped: the real BiSeNet layout at 1/8 of the channels."""
    from generation.pulid.bisenet import BiSeNet

    torch.manual_seed(seed)
    model = BiSeNet(num_classes=19, base_width=TINY_BISENET_WIDTH)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_pulid_weights(path: Path, *, embedder_dims: int, seed: int = 12) -> Path:
    """`pulid_flux_v0.9.1.safetensors`-shaped: `pulid_encoder.*` (IDFormer) and `pulid_ca.N.*`."""
    from safetensors.torch import save_file
    from torch import nn

    from generation.pulid.encoders import IDFormer, PerceiverAttentionCA

    torch.manual_seed(seed)
    encoder = IDFormer(
        **TINY_IDFORMER,
        vit_dim=TINY_EVA["width"],
        mapping_dim=TINY_IDFORMER_MAPPING_DIM,
        id_input_dim=embedder_dims + TINY_EVA["embed_dim"],
    )
    ca = nn.ModuleList(
        PerceiverAttentionCA(
            dim=TINY_FLUX_INNER_DIM, dim_head=TINY_FLUX_INNER_DIM, heads=1, kv_dim=TINY_IDFORMER["output_dim"]
        )
        for _ in range(TINY_FLUX_NUM_CA)
    )
    state = {f"pulid_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"pulid_ca.{k}": v for k, v in ca.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def write_pulid_components(models_dir: Path, *, embedder_dims: int) -> None:
    """Everything `pulid_flux` needs besides FLUX itself (the caller writes `flux1-dev/` with write_flux)."""
    models_dir = Path(models_dir)
    write_pulid_weights(component_path(models_dir, "pulid_flux_weights"), embedder_dims=embedder_dims)
    write_eva_clip(component_path(models_dir, "eva_clip"))
    write_bisenet(component_path(models_dir, "face_parsing"))
