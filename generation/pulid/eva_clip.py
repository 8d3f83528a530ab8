"""EVA02-CLIP-L-14-336 vision tower, as PuLID uses it (`model.visual` of `EVA02_CLIP_L_336_psz14_s6B.pt`).

A pre-norm ViT with EVA-02's changes: 2-D rotary position embeddings on q/k (not on the class token),
attention with separate q/k/v projections, q/v biases and a LayerNorm before the output projection
("sub-LN"), and a SwiGLU MLP with a LayerNorm on its hidden layer. All LayerNorms use eps 1e-6.
Names match the checkpoint's `visual.*` keys. The rotary tables are derived from the geometry,
so they are non-persistent buffers, and copies of them in a checkpoint are ignored (as the
eva_clip loader does).

`forward(pixels)` returns PuLID's two inputs: the projected class-token embedding and the hidden
states entering blocks 4, 8, 12, 16 and 20 (of 24).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-6


def rope_tables(head_dim: int, grid: int, pretrain_grid: int = 16, theta: float = 10000.0):
    """cos/sin tables (grid*grid, head_dim) of EVA-02's 2-D RoPE.

    The first half of each head rotates with the patch row, the second half with the column;
    positions are rescaled to the pre-training grid (16 = 224/14) so a 24x24 grid interpolates.
    Channels rotate in adjacent pairs (x0, x1), (x2, x3), ...
    """
    axis_dim = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2).float() / axis_dim)
    positions = torch.arange(grid).float() / grid * pretrain_grid
    freqs = torch.outer(positions, inv_freq).repeat_interleave(2, dim=-1)  # (grid, axis_dim)
    rows = freqs[:, None, :].expand(grid, grid, axis_dim)
    cols = freqs[None, :, :].expand(grid, grid, axis_dim)
    angles = torch.cat((rows, cols), dim=-1).reshape(grid * grid, head_dim)
    return angles.cos(), angles.sin()


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, grid: int, pretrain_grid: int = 16):
        super().__init__()
        cos, sin = rope_tables(head_dim, grid, pretrain_grid)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.freqs_cos.to(x.dtype), self.freqs_sin.to(x.dtype)
        return x * cos + _rotate_pairs(x) * sin


class EvaAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        # k has no bias in EVA (it would cancel in the softmax), q and v do.
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRotaryEmbedding) -> torch.Tensor:
        batch, length, _ = x.shape
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = self.k_proj(x)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        # Rotary positions apply to the patch tokens; the class token (index 0) has no position.
        q = torch.cat((q[:, :, :1], rope(q[:, :, 1:])), dim=2)
        k = torch.cat((k[:, :, :1], rope(k[:, :, 1:])), dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, -1)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.ffn_ln = nn.LayerNorm(hidden_dim, eps=LN_EPS)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EvaBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = EvaAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = SwiGLU(dim, mlp_dim)

    def forward(self, x: torch.Tensor, rope: VisionRotaryEmbedding) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)


class EvaVisionTransformer(nn.Module):
    """EVA02-CLIP vision tower; defaults are EVA02-CLIP-L-14-336's (width 1024, 24 layers, 16 heads)."""

    def __init__(
        self,
        image_size: int = 336,
        patch_size: int = 14,
        width: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_dim: int = 2730,  # int(1024 * 2.6667)
        embed_dim: int = 768,
        pretrain_grid: int = 16,
        hidden_state_layers: tuple[int, ...] | None = None,
    ):
        super().__init__()
        grid = image_size // patch_size
        self.image_size = image_size
        self.embed_dim = embed_dim
        # PuLID taps the inputs of blocks 4, 8, 12, 16, 20 of 24; smaller towers tap at the same fractions.
        self.hidden_state_layers = hidden_state_layers or tuple(k * max(depth // 6, 1) for k in range(1, 6))
        if max(self.hidden_state_layers) >= depth:
            raise ValueError(f"an EVA tower of depth {depth} cannot provide hidden states {self.hidden_state_layers}")
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.rope = VisionRotaryEmbedding(width // num_heads // 2 * 2, grid, pretrain_grid)
        self.blocks = nn.ModuleList(EvaBlock(width, num_heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.head = nn.Linear(width, embed_dim)

    @property
    def width(self) -> int:
        return self.cls_token.shape[-1]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised (B, 3, S, S) pixels → (class embedding (B, embed_dim), 5 hidden states (B, 1+N, width))."""
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1) + self.pos_embed
        hidden_states = []
        for index, block in enumerate(self.blocks):
            if index in self.hidden_state_layers:
                hidden_states.append(x)
            x = block(x, self.rope)
        return self.head(self.norm(x)[:, 0]), hidden_states
