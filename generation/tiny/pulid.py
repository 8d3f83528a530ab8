"""Tiny PuLID-FLUX components: IDFormer + cross-attentions, EVA02-CLIP vision tower, BiSeNet parser.

Real classes and real key names, small sizes; the loaders read every size back from the shapes.
The cross-attentions fit the tiny FLUX transformer of `base_models.write_flux` (inner dim 32,
1 double + 1 single block → 1 + 1 modules) and the IDFormer takes `embedder_dims` + the tiny
EVA embedding, so the real loading, alignment, parsing and injection code runs on CPU in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generation.model_registry import component_path, write_embedding_space

# The tiny FLUX transformer of base_models.write_flux: 2 heads x 16 dims, 1 double + 1 single block.
TINY_FLUX_INNER_DIM = 32
TINY_FLUX_NUM_CA = 2  # ceil(1 / 2) + ceil(1 / 4)

TINY_EVA = dict(image_size=56, patch_size=14, width=64, depth=6, num_heads=1, mlp_dim=170, embed_dim=32)
#: EVA02-CLIP-L-14-336's text tower is 12 x 768 wide over a 77-token context and a 49408-word vocabulary
TINY_EVA_TEXT = dict(width=16, layers=2, context_length=77, vocab_size=64)
TINY_IDFORMER = dict(dim=32, depth=5, dim_head=32, heads=1, num_id_token=5, num_queries=8, output_dim=16, ff_mult=2)
TINY_IDFORMER_MAPPING_DIM = 32
TINY_BISENET_WIDTH = 8


def clip_text_tower_state(*, width: int, layers: int, context_length: int, vocab_size: int, embed_dim: int) -> dict:
    """`text.*` of an EVA-CLIP checkpoint: OpenCLIP's text transformer, real key names, small sizes."""
    from collections import OrderedDict

    from torch import nn

    def block() -> nn.Module:
        return nn.ModuleDict(
            dict(
                ln_1=nn.LayerNorm(width),
                attn=nn.MultiheadAttention(width, 1),
                ln_2=nn.LayerNorm(width),
                mlp=nn.Sequential(
                    OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
                ),
            )
        )

    tower = nn.ModuleDict(
        dict(
            token_embedding=nn.Embedding(vocab_size, width),
            transformer=nn.ModuleDict(dict(resblocks=nn.ModuleList(block() for _ in range(layers)))),
            ln_final=nn.LayerNorm(width),
        )
    )
    state = {f"text.{k}": v for k, v in tower.state_dict().items()}
    state["text.positional_embedding"] = torch.randn(context_length, width) * 0.01
    state["text.text_projection"] = torch.randn(width, embed_dim) * width**-0.5
    return state


def write_eva_clip(path: Path, seed: int = 10) -> Path:
    """`EVA02_CLIP_L_336_psz14_s6B.pt`-shaped: a whole EVA-CLIP model in the released file's layout.

    Like the real file: the vision tower (`visual.*`, with EVA-02's rotary tables saved under the
    tower and again under every block, as the shared module is), an OpenCLIP text tower (`text.*`)
    and `logit_scale`, so the production loader's filtering is what the tests exercise.
    """
    from generation.pulid.eva_clip import EvaVisionTransformer

    torch.manual_seed(seed)
    model = EvaVisionTransformer(**TINY_EVA)
    for name, param in model.named_parameters():  # zeros-initialised tokens would hide bugs
        if name in ("cls_token", "pos_embed") or name.endswith(("q_bias", "v_bias")):
            torch.nn.init.normal_(param, std=0.02)
    state = {f"visual.{k}": v.clone() for k, v in model.state_dict().items()}
    rope_names = ["visual.rope"] + [f"visual.blocks.{i}.attn.rope" for i in range(TINY_EVA["depth"])]
    for name in rope_names:
        state[f"{name}.freqs_cos"] = model.rope.freqs_cos.clone()
        state[f"{name}.freqs_sin"] = model.rope.freqs_sin.clone()
    state.update(clip_text_tower_state(**TINY_EVA_TEXT, embed_dim=TINY_EVA["embed_dim"]))
    state["logit_scale"] = torch.tensor(4.6052)  # log(100), as trained CLIPs end up
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


def write_pulid_components(models_dir: Path, *, embedder_dims: int | None = None, embedder: str | None = None) -> None:
    """Everything `pulid_flux` needs besides FLUX itself (the caller writes `flux1-dev/` with write_flux).

    The IDFormer takes `embedder`'s embeddings (default: the active face embedder), `embedder_dims` wide
    (default: that embedder's width), and `pulid/embedding_space.json` declares the embedder.
    """
    from generation.tiny.build import embedding_space_for

    models_dir = Path(models_dir)
    embedder, embedder_dims = embedding_space_for(embedder, embedder_dims)
    write_embedding_space(models_dir, "pulid_flux", embedder)
    write_pulid_weights(component_path(models_dir, "pulid_flux_weights"), embedder_dims=embedder_dims)
    write_eva_clip(component_path(models_dir, "eva_clip"))
    write_bisenet(component_path(models_dir, "face_parsing"))
