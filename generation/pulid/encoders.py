"""PuLID's ID encoder (IDFormer) and the cross-attention that injects its tokens into FLUX.

Module and parameter names follow the released `pulid_flux_v0.9.1.safetensors` (keys `pulid_encoder.*`
and `pulid_ca.N.*`), so the real file loads with `strict=True`. Sizes that the release hard-codes
(1024-wide feature mappings, the 1280-d ID input = 512 ArcFace + 768 EVA-CLIP) are constructor
arguments here whose defaults are the real values; tiny test weights only change the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from generation.perceiver import PerceiverAttention, feed_forward, heads_first

__all__ = ["IDFormer", "PerceiverAttention", "PerceiverAttentionCA", "feed_forward", "mlp_mapping"]


def mlp_mapping(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → LN → LeakyReLU twice, then a projection (keys `0, 1, 3, 4, 6`)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, out_dim),
    )


class PerceiverAttentionCA(nn.Module):
    """Image tokens of a FLUX block (queries) attend to the ID tokens (keys/values) only.

    `forward(id_tokens, hidden_states)` returns the residual PuLID adds to the image stream.
    Defaults are FLUX.1-dev's: inner dim 3072 = 16 heads x 128 queries over 2048-d ID tokens.
    """

    def __init__(self, *, dim: int = 3072, dim_head: int = 128, heads: int = 16, kv_dim: int | None = 2048):
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        kv_dim = dim if kv_dim is None else kv_dim
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, id_tokens: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        id_tokens = self.norm1(id_tokens)
        query = self.to_q(self.norm2(hidden_states))
        key, value = self.to_kv(id_tokens).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(*(heads_first(t, self.heads) for t in (query, key, value)))
        return self.to_out(out.transpose(1, 2).flatten(2))


class IDFormer(nn.Module):
    """Perceiver resampler from (face embedding ⊕ EVA-CLIP embedding, 5 EVA hidden states) to ID tokens.

    The ID vector is mapped to `num_id_token` tokens that join the `num_queries` learned latents;
    each of the 5 EVA-CLIP hidden states (shallow → deep), mapped to `dim`, is the context of
    `depth / 5` attention + FFN layers. The first `num_queries` latents, projected to
    `output_dim`, are the ID tokens the FLUX cross-attentions read.
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 10,
        dim_head: int = 64,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: float = 4,
        vit_dim: int = 1024,  # EVA02-CLIP-L width (hard-coded in the release)
        mapping_dim: int = 1024,  # hidden width of the mapping MLPs (hard-coded in the release)
        id_input_dim: int = 1280,  # 512 ArcFace + 768 EVA-CLIP embedding (hard-coded in the release)
        num_vit_features: int = 5,
    ):
        super().__init__()
        if depth % num_vit_features:
            raise ValueError(f"IDFormer depth {depth} must be a multiple of {num_vit_features}")
        self.dim = dim
        self.num_id_token = num_id_token
        self.num_queries = num_queries
        self.num_vit_features = num_vit_features
        self.layers_per_feature = depth // num_vit_features
        scale = dim**-0.5

        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) * scale)
        self.proj_out = nn.Parameter(scale * torch.randn(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        for i in range(num_vit_features):
            setattr(self, f"mapping_{i}", mlp_mapping(vit_dim, mapping_dim, dim))
        self.id_embedding_mapping = mlp_mapping(id_input_dim, mapping_dim, dim * num_id_token)

    @property
    def id_input_dim(self) -> int:
        return self.id_embedding_mapping[0].in_features

    @property
    def output_dim(self) -> int:
        return self.proj_out.shape[1]

    def forward(self, id_vector: torch.Tensor, vit_hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """(B, id_input_dim), 5 x (B, L, vit_dim) → (B, num_queries, output_dim)."""
        batch = id_vector.shape[0]
        id_tokens = self.id_embedding_mapping(id_vector).reshape(batch, self.num_id_token, self.dim)
        latents = torch.cat((self.latents.expand(batch, -1, -1), id_tokens), dim=1)
        for i in range(self.num_vit_features):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(vit_hidden_states[i])), dim=1)
            start = i * self.layers_per_feature
            for attn, ff in self.layers[start : start + self.layers_per_feature]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : self.num_queries] @ self.proj_out
