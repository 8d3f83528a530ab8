"""The IP-Adapter image-projection Resampler InstantID puts over the face embedding.

A small Perceiver: `num_queries` learned latent tokens cross-attend (together with themselves) to the
projected face embedding, `depth` times, then are projected to the UNet's cross-attention width.
The output is the "ID tokens": appended to the text tokens for the UNet's decoupled cross-attention
and given alone to IdentityNet (the ControlNet) as its `encoder_hidden_states`.

Module and parameter names follow the public `ip-adapter.bin` (`image_proj` section) so the real
weights load strictly: `latents`, `proj_in`, `layers.{i}.0` (attention: `norm1`, `norm2`, `to_q`,
`to_kv`, `to_out`), `layers.{i}.1` (feed-forward `Sequential`: 0 LayerNorm, 1 Linear, 2 GELU, 3 Linear),
`proj_out`, `norm_out`.
"""

from __future__ import annotations

import torch
from torch import nn

from generation.perceiver import PerceiverAttention, feed_forward

#: the configuration of InstantID's released Resampler (512-d ArcFace in, 16 tokens of 2048 out)
INSTANTID_RESAMPLER = dict(
    dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4
)


class Resampler(nn.Module):
    """Face embedding (B, N, embedding_dim) → ID tokens (B, num_queries, output_dim).

    Defaults are InstantID's released configuration (`INSTANTID_RESAMPLER`); tiny test weights use
    the same class with small dimensions (see `config_from_state_dict`).
    """

    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 512,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
                for _ in range(depth)
            ]
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B, N, embedding_dim), N = 1 for one face embedding."""
        latents = self.latents.expand(embeddings.shape[0], -1, -1)
        features = self.proj_in(embeddings)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def config_from_state_dict(state_dict: dict[str, torch.Tensor], dim_head: int = 64) -> dict:
    """The Resampler configuration that `state_dict` was saved from, read off the tensor shapes.

    `dim_head` cannot be told apart from `heads` by shapes (only their product is stored); InstantID's
    release uses 64, and so do our tiny weights. Raises KeyError naming a key the inference needs.
    """
    num_queries, dim = state_dict["latents"].shape[1:]
    depth = 0
    while f"layers.{depth}.0.to_q.weight" in state_dict:
        depth += 1
    if depth == 0:
        raise KeyError("layers.0.0.to_q.weight")
    inner = state_dict["layers.0.0.to_q.weight"].shape[0]
    return dict(
        dim=int(dim),
        depth=depth,
        dim_head=dim_head,
        heads=int(inner // dim_head),
        num_queries=int(num_queries),
        embedding_dim=int(state_dict["proj_in.weight"].shape[1]),
        output_dim=int(state_dict["proj_out.weight"].shape[0]),
        ff_mult=int(state_dict["layers.0.1.1.weight"].shape[0] // dim),
    )
