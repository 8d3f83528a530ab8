"""Strict loading of InstantID's `ip-adapter.bin`: the Resampler and the decoupled cross-attention weights.

The file is a `torch.save`d dict with two sections:

- `image_proj`: the Resampler's state dict (`generation.instantid.resampler`);
- `ip_adapter`: `{i}.to_k_ip.weight` / `{i}.to_v_ip.weight` for every cross-attention processor `i`
  of the UNet (`generation.instantid.attention.ip_adapter_keys`).

Any missing or unexpected key, or a tensor of the wrong shape, is an `InvalidWeights` naming the keys
and the file: a half-loaded adapter would silently generate someone else's face.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from generation.instantid.attention import install_ip_processors, ip_adapter_keys
from generation.instantid.resampler import Resampler, config_from_state_dict
from generation.methods.base import InvalidWeights

SECTIONS = ("image_proj", "ip_adapter")


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(path: Path, section: str, expected: list[str], found: list[str]) -> None:
    """Raise InvalidWeights naming every missing and unexpected key of `section` in `path`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    raise InvalidWeights(
        f"{path} does not match InstantID's architecture: section '{section}' has {'; '.join(problems)}.",
        details={"file": str(path), "section": section, "missing": missing, "unexpected": unexpected},
    )


def _load_strict(path: Path, section: str, module: nn.Module, state_dict: dict) -> None:
    check_keys(path, section, list(module.state_dict()), list(state_dict))
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # right names, wrong shapes
        raise InvalidWeights(f"{path}: section '{section}' has tensors of the wrong shape: {exc}") from exc


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The two sections of `ip-adapter.bin`, tensors only (no pickled code is executed)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidWeights(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidWeights(f"{path} should hold a dict with sections {', '.join(SECTIONS)}")
    check_keys(path, "top level", list(SECTIONS), list(data))
    return data


def load_resampler(path: Path, state_dict: dict[str, torch.Tensor], *, embedder_dims: int | None, embedder_name: str):
    """A Resampler built for the shapes in `state_dict` and loaded strictly.

    Its input width must be the active face embedder's: the release was trained on 512-d antelopev2
    ArcFace embeddings, and an embedding of another width (or another embedder's space) is meaningless to it.
    """
    try:
        config = config_from_state_dict(state_dict)
    except KeyError as exc:  # a key the shapes are read from
        missing = exc.args[0]
        raise InvalidWeights(
            f"{path} does not match InstantID's architecture: section 'image_proj' has missing keys {missing}.",
            details={"file": str(path), "section": "image_proj", "missing": [missing], "unexpected": []},
        ) from None
    if embedder_dims is not None and config["embedding_dim"] != embedder_dims:
        raise InvalidWeights(
            f"{path}: the Resampler takes {config['embedding_dim']}-d face embeddings but the active face embedder "
            f"'{embedder_name}' gives {embedder_dims}-d ones. InstantID's weights need the embedder they were "
            "trained with (arcface_antelopev2, 512-d); set ALKEMY_FACE_EMBEDDER accordingly, or build test weights "
            "for this embedder.",
            details={"file": str(path), "resampler_dims": config["embedding_dim"], "embedder_dims": embedder_dims},
        )
    resampler = Resampler(**config)
    _load_strict(path, "image_proj", resampler, state_dict)
    return resampler.eval()


def load_ip_adapter(
    path: Path, unet, *, embedder_dims: int | None, embedder_name: str = "", scale: float = 1.0
) -> Resampler:
    """Load `ip-adapter.bin` strictly: returns the Resampler and installs the ID processors on `unet`.

    `unet` is left untouched when the file's keys do not match it.
    """
    path = Path(path)
    data = read_ip_adapter(path)
    resampler = load_resampler(path, data["image_proj"], embedder_dims=embedder_dims, embedder_name=embedder_name)
    cross_attention_dim = unet.config.cross_attention_dim
    if resampler.output_dim != cross_attention_dim:
        raise InvalidWeights(
            f"{path}: the Resampler makes {resampler.output_dim}-d ID tokens but the UNet's cross-attention "
            f"takes {cross_attention_dim}-d tokens; the adapter is for another base model."
        )
    ip_state = data["ip_adapter"]
    check_keys(path, "ip_adapter", ip_adapter_keys(unet), list(ip_state))
    processors = install_ip_processors(
        unet, cross_attention_dim=cross_attention_dim, num_tokens=resampler.latents.shape[1], scale=scale
    )
    _load_strict(path, "ip_adapter", processors, ip_state)
    return resampler
