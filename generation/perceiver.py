"""The perceiver-resampler blocks of IP-Adapter, which both PuLID's IDFormer and InstantID's
Resampler are built from (same module and parameter names in both released weight files)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    """Pre-norm MLP without biases; a Sequential because the weight files index it (`0, 1, 3`)."""
    inner_dim = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner_dim, bias=False),
        nn.GELU(),
        nn.Linear(inner_dim, dim, bias=False),
    )


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, heads, -1).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Latents attend to the (normalised) context concatenated with themselves.

    `forward(context (B, N, kv_dim), latents (B, Q, dim)) -> (B, Q, dim)`.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        kv_dim = dim if kv_dim is None else kv_dim
        self.norm1 = nn.LayerNorm(kv_dim)  # for the context
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.norm1(context)
        latents = self.norm2(latents)
        query = self.to_q(latents)
        key, value = self.to_kv(torch.cat((context, latents), dim=1)).chunk(2, dim=-1)
        # SDPA accumulates in fp32, so half-precision logits stay in range as in the released code.
        out = F.scaled_dot_product_attention(*(heads_first(t, self.heads) for t in (query, key, value)))
        return self.to_out(out.transpose(1, 2).flatten(2))
