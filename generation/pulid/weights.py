"""Strict loading of PuLID's three weight files, with architectures read from the tensor shapes.

Every loader builds the module from the shapes in the file (so the tiny test files and the real
ones go through the same code), then insists that the file's keys are exactly the module's:
any missing or unexpected key raises `InvalidWeights` naming the keys and the file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from generation.methods.base import InvalidWeights
from generation.pulid.bisenet import BiSeNet
from generation.pulid.encoders import IDFormer, PerceiverAttentionCA
from generation.pulid.eva_clip import EvaVisionTransformer
from generation.pulid.flux_hooks import num_ca_modules

IDFORMER_PREFIX = "pulid_encoder."
CA_PREFIX = "pulid_ca."
EVA_PREFIX = "visual."
#: head widths the release uses: IDFormer 64, the FLUX cross-attentions 128, EVA-CLIP 64
IDFORMER_HEAD_DIM, CA_HEAD_DIM, EVA_HEAD_DIM = 64, 128, 64


def _heads(inner_dim: int, head_dim: int) -> int:
    """Number of heads of a projection of `inner_dim` channels; tiny models get one head."""
    return max(inner_dim // head_dim, 1) if inner_dim % head_dim == 0 else 1


def _shape(state_dict: dict, key: str, file: Path) -> torch.Size:
    if key not in state_dict:
        raise InvalidWeights(f"{file} is missing key '{key}'", details={"file": str(file), "missing": [key]})
    return state_dict[key].shape


def _count(state_dict: dict, pattern: str) -> int:
    """1 + the largest N of keys matching `pattern` (a regex with one group for N), or 0."""
    indices = [int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))]
    return max(indices) + 1 if indices else 0


def _names(keys, prefix: str, limit: int = 10) -> str:
    keys = sorted(prefix + k for k in keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(module: nn.Module, state_dict: dict, file: Path, prefix: str = "") -> None:
    """`module.load_state_dict(strict=True)`, failing with InvalidWeights that names keys and file."""
    expected = module.state_dict()
    # BatchNorm's step counter is training bookkeeping; files from older PyTorch lack it.
    state_dict = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state_dict}
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    wrong_shape = {k for k in expected.keys() & state_dict.keys() if expected[k].shape != state_dict[k].shape}
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys: {_names(missing, prefix)}")
        if unexpected:
            problems.append(f"unexpected keys: {_names(unexpected, prefix)}")
        if wrong_shape:
            problems.append(f"keys with the wrong shape: {_names(wrong_shape, prefix)}")
        raise InvalidWeights(
            f"{file} does not match {type(module).__name__}: " + "; ".join(problems),
            details={
                "file": str(file),
                "missing": sorted(prefix + k for k in missing),
                "unexpected": sorted(prefix + k for k in unexpected),
                "wrong_shape": sorted(prefix + k for k in wrong_shape),
            },
        )
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- EVA02-CLIP


def eva_config(visual: dict, file: Path) -> dict:
    """EvaVisionTransformer kwargs from the shapes of the `visual.*` tensors."""
    width = _shape(visual, "cls_token", file)[-1]
    patch_size = _shape(visual, "patch_embed.proj.weight", file)[-1]
    grid = math.isqrt(_shape(visual, "pos_embed", file)[1] - 1)
    return dict(
        image_size=grid * patch_size,
        patch_size=patch_size,
        width=width,
        depth=_count(visual, r"blocks\.(\d+)\."),
        num_heads=max(width // EVA_HEAD_DIM, 1),
        mlp_dim=_shape(visual, "blocks.0.mlp.w1.weight", file)[0],
        embed_dim=_shape(visual, "head.weight", file)[0],
    )


def _read_checkpoint(path: Path) -> dict:
    """A torch checkpoint's tensors, never running pickled code (`weights_only=True`)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidWeights(f"{path} is not a readable torch checkpoint: {exc}", details={"file": str(path)}) from exc
    if not isinstance(checkpoint, dict):
        raise InvalidWeights(f"{path} should hold a state dict", details={"file": str(path)})
    return checkpoint


#: Keys of the released `EVA02_CLIP_L_336_psz14_s6B.pt` that PuLID does not use, by exact name pattern.
#: The file is a whole EVA-CLIP model: besides `visual.*` it holds the text tower (an OpenCLIP
#: transformer with nn.MultiheadAttention blocks) and the contrastive `logit_scale`. EVA-02's rotary
#: tables are one module shared by the tower and every block, so they are saved under each name;
#: they follow from the geometry and are recomputed (the eva_clip loader can drop them too).
EVA_UNUSED_KEYS = re.compile(
    "|".join(
        (
            r"logit_scale",
            r"text\.logit_scale",  # where older eva_clip checkpoints keep it
            r"text\.(token_embedding\.weight|positional_embedding|text_projection|ln_final\.(weight|bias))",
            r"text\.transformer\.resblocks\.\d+\.(ln_1|ln_2)\.(weight|bias)",
            r"text\.transformer\.resblocks\.\d+\.attn\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))",
            r"text\.transformer\.resblocks\.\d+\.mlp\.(c_fc|c_proj)\.(weight|bias)",
            r"visual\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)",
        )
    )
)


def load_eva_clip(path: Path) -> EvaVisionTransformer:
    """The vision tower of the full EVA-CLIP checkpoint, strictly.

    `visual.*` must be exactly the tower's keys; the text tower, `logit_scale` and the rotary
    tables are ignored by name (`EVA_UNUSED_KEYS`); any other key is refused.
    """
    checkpoint = _read_checkpoint(path)
    for wrapper in ("model", "module", "state_dict"):  # the eva_clip loader accepts these wrappers
        if isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    checkpoint = {k.removeprefix("module."): v for k, v in checkpoint.items()}
    visual, unexpected = {}, []
    for key, value in checkpoint.items():
        if EVA_UNUSED_KEYS.fullmatch(key):
            continue
        if key.startswith(EVA_PREFIX):
            visual[key.removeprefix(EVA_PREFIX)] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise InvalidWeights(
            f"{path} is not an EVA-CLIP checkpoint: unexpected keys: {_names(unexpected, '')}",
            details={"file": str(path), "missing": [], "unexpected": sorted(unexpected), "wrong_shape": []},
        )
    if not visual:
        raise InvalidWeights(
            f"{path} has no '{EVA_PREFIX}*' keys: not an EVA-CLIP checkpoint", details={"file": str(path)}
        )
    config = eva_config(visual, path)
    if config["depth"] < 6:
        raise InvalidWeights(f"{path}: an EVA tower of {config['depth']} blocks cannot give PuLID 5 hidden states")
    model = EvaVisionTransformer(**config)
    load_strict(model, visual, path, EVA_PREFIX)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- BiSeNet


def load_bisenet(path: Path) -> BiSeNet:
    """facexlib's `parsing_bisenet.pth` (a plain BiSeNet state dict, loaded strictly as facexlib does)."""
    state_dict = _read_checkpoint(path)
    model = BiSeNet(
        num_classes=_shape(state_dict, "conv_out.conv_out.weight", path)[0],
        base_width=_shape(state_dict, "cp.resnet.conv1.weight", path)[0],
    )
    load_strict(model, state_dict, path)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- PuLID


def idformer_config(encoder: dict, file: Path) -> dict:
    """IDFormer kwargs from the shapes of the `pulid_encoder.*` tensors."""
    _, num_queries, dim = _shape(encoder, "latents", file)
    inner_dim = _shape(encoder, "layers.0.0.to_q.weight", file)[0]
    heads = _heads(inner_dim, IDFORMER_HEAD_DIM)
    return dict(
        dim=dim,
        depth=_count(encoder, r"layers\.(\d+)\."),
        dim_head=inner_dim // heads,
        heads=heads,
        num_id_token=_shape(encoder, "id_embedding_mapping.6.weight", file)[0] // dim,
        num_queries=num_queries,
        output_dim=_shape(encoder, "proj_out", file)[1],
        ff_mult=_shape(encoder, "layers.0.1.1.weight", file)[0] / dim,
        vit_dim=_shape(encoder, "mapping_0.0.weight", file)[1],
        mapping_dim=_shape(encoder, "mapping_0.0.weight", file)[0],
        id_input_dim=_shape(encoder, "id_embedding_mapping.0.weight", file)[1],
    )


def ca_config(ca: dict, file: Path) -> dict:
    """PerceiverAttentionCA kwargs from the shapes of `pulid_ca.0.*`."""
    inner_dim, dim = _shape(ca, "0.to_q.weight", file)
    heads = _heads(inner_dim, CA_HEAD_DIM)
    return dict(dim=dim, dim_head=inner_dim // heads, heads=heads, kv_dim=_shape(ca, "0.to_kv.weight", file)[1])


def load_pulid(
    path: Path, *, transformer_dim: int, num_double: int, num_single: int, eva: EvaVisionTransformer
) -> tuple[IDFormer, nn.ModuleList]:
    """IDFormer + cross-attentions from `pulid_flux_*.safetensors`, checked against FLUX and EVA-CLIP."""
    from safetensors.torch import load_file

    state_dict = load_file(path)
    encoder = {k.removeprefix(IDFORMER_PREFIX): v for k, v in state_dict.items() if k.startswith(IDFORMER_PREFIX)}
    ca = {k.removeprefix(CA_PREFIX): v for k, v in state_dict.items() if k.startswith(CA_PREFIX)}
    others = [k for k in state_dict if not k.startswith((IDFORMER_PREFIX, CA_PREFIX))]
    if others:
        raise InvalidWeights(
            f"{path} has unexpected keys: {_names(others, '')}", details={"file": str(path), "unexpected": others}
        )

    config = idformer_config(encoder, path)
    if config["vit_dim"] != eva.width:
        raise InvalidWeights(
            f"{path}: the IDFormer reads {config['vit_dim']}-d EVA-CLIP hidden states but the EVA-CLIP tower "
            f"is {eva.width} wide",
            details={"file": str(path)},
        )
    if config["id_input_dim"] <= eva.embed_dim:
        raise InvalidWeights(
            f"{path}: id_embedding_mapping.0.weight takes {config['id_input_dim']} inputs, which cannot be a face "
            f"embedding plus the {eva.embed_dim}-d EVA-CLIP embedding",
            details={"file": str(path)},
        )
    encoder_model = IDFormer(**config)
    load_strict(encoder_model, encoder, path, IDFORMER_PREFIX)

    expected = num_ca_modules(num_double, num_single)
    found = _count(ca, r"(\d+)\.")
    if found != expected:
        raise InvalidWeights(
            f"{path} has {found} PuLID cross-attentions (pulid_ca.0-{found - 1}) but a FLUX transformer with "
            f"{num_double} double and {num_single} single blocks takes {expected}",
            details={"file": str(path)},
        )
    ca_kwargs = ca_config(ca, path)
    if ca_kwargs["dim"] != transformer_dim or ca_kwargs["kv_dim"] != encoder_model.output_dim:
        raise InvalidWeights(
            f"{path}: cross-attentions of dim {ca_kwargs['dim']} over {ca_kwargs['kv_dim']}-d ID tokens do not fit "
            f"a {transformer_dim}-wide FLUX transformer and {encoder_model.output_dim}-d ID tokens",
            details={"file": str(path)},
        )
    ca_modules = nn.ModuleList(PerceiverAttentionCA(**ca_kwargs) for _ in range(expected))
    load_strict(ca_modules, ca, path, CA_PREFIX)
    return encoder_model.eval().requires_grad_(False), ca_modules.eval().requires_grad_(False)
