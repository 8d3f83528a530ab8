"""Decoupled cross-attention (IP-Adapter) for the SDXL UNet.

Every cross-attention layer gets its own key/value projections for the ID tokens (`to_k_ip`,
`to_v_ip`); the query is shared. The layer's output is

    attention(q, K_text, V_text) + scale * attention(q, K_id, V_id)

so `scale = 0` gives back the plain UNet exactly. The UNet receives the text tokens with the ID tokens
appended (`num_tokens` of them); the processor splits them off again.

Weights: `ip-adapter.bin["ip_adapter"]` names the parameters `{i}.to_k_ip.weight` where `i` is the
position of the layer's processor in `unet.attn_processors` (self-attention processors included,
so on SDXL the cross-attention layers are 1, 3, 5, ..., 139). `ip_adapter_keys` lists them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class IPAttnProcessor(nn.Module):
    """Cross-attention over text tokens plus a scaled, separate attention over the last `num_tokens` ID tokens.

    An `nn.Module` so its two projections follow the UNet through `.to()`, offload hooks and state dicts.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = 16, scale: float = 1.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.scale = scale
        #: {image tokens of a UNet level: (1, tokens, 1) mask}; empty = the ID attends everywhere
        self.region_masks: dict[int, torch.Tensor] = {}
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        # Follows diffusers' AttnProcessor2_0 step for step, so that with scale 0 the result is the same tensor.
        if encoder_hidden_states is None:
            raise ValueError("IPAttnProcessor is for cross-attention layers: encoder_hidden_states is required")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        text_states = encoder_hidden_states[:, : -self.num_tokens]
        id_states = encoder_hidden_states[:, -self.num_tokens :]
        batch_size, sequence_length, _ = text_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            # Only the text tokens: the ID tokens were trained without the layer's cross norm.
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = attn.to_k(text_states)
        value = attn.to_v(text_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if self.scale != 0:  # skipping the ID branch at scale 0 saves its cost and keeps the result exact
            id_key, id_value = heads(self.to_k_ip(id_states)), heads(self.to_v_ip(id_states))
            # No mask: every image token may attend to every ID token.
            id_hidden = F.scaled_dot_product_attention(query, id_key, id_value)
            id_hidden = id_hidden.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            if self.region_masks:
                # InstantID's region control ("enhance non-face region"): the ID only acts inside the face box.
                id_hidden = id_hidden * self.region_masks[id_hidden.shape[1]].to(id_hidden)
            hidden_states = hidden_states + self.scale * id_hidden.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _is_cross_attention(name: str) -> bool:
    # diffusers names a transformer block's self-attention `attn1` and its cross-attention `attn2`.
    return not name.endswith("attn1.processor")


def _hidden_size(unet, name: str) -> int:
    """The channel width of the block the processor `name` lives in."""
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    block_id = int(name.split(".")[1])
    if name.startswith("up_blocks"):
        return list(reversed(channels))[block_id]
    return channels[block_id]


def ip_adapter_keys(unet) -> list[str]:
    """Every key `ip-adapter.bin["ip_adapter"]` must hold for `unet`, in processor order."""
    keys = []
    for index, name in enumerate(unet.attn_processors):
        if _is_cross_attention(name):
            keys += [f"{index}.to_k_ip.weight", f"{index}.to_v_ip.weight"]
    return keys


def install_ip_processors(unet, *, cross_attention_dim: int, num_tokens: int, scale: float = 1.0) -> nn.ModuleDict:
    """Put an `IPAttnProcessor` on every cross-attention layer of `unet` (self-attention keeps its own).

    Returns the new processors keyed as in the weight file (`"1"`, `"3"`, ...), so that
    `result.load_state_dict(state_dict["ip_adapter"])` loads them by the file's names.
    """
    processors = {}
    by_index = {}
    for index, (name, current) in enumerate(unet.attn_processors.items()):
        if _is_cross_attention(name):
            processor = IPAttnProcessor(_hidden_size(unet, name), cross_attention_dim, num_tokens, scale)
            processor.to(unet.device, unet.dtype)  # the UNet may already be in bf16/fp16 or on the GPU
            processors[name] = by_index[str(index)] = processor
        else:
            processors[name] = current
    unet.set_attn_processor(processors)
    return nn.ModuleDict(by_index)


def set_ip_scale(unet, scale: float) -> None:
    """Weight of the ID branch in every decoupled cross-attention layer (0 turns it off)."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, IPAttnProcessor):
            processor.scale = float(scale)


def set_region_masks(unet, masks: dict[int, torch.Tensor] | None) -> None:
    """Restrict the ID branch of every decoupled cross-attention to a region (None: everywhere).

    `masks` maps the number of image tokens at each UNet resolution to a (1, tokens, 1) weight.
    """
    for processor in unet.attn_processors.values():
        if isinstance(processor, IPAttnProcessor):
            processor.region_masks = dict(masks or {})
