"""Reference faces → PuLID ID tokens: align, parse, EVA-CLIP, IDFormer; and how several faces combine.

Several references are our extension: PuLID's FLUX pipeline takes exactly one ID image (and
within it the largest face); PuLID v1.1 (SDXL) feeds several photos jointly to one IDFormer call.
With one reference both modes give that reference's own ID tokens, the official case. Each reference photo
is encoded on its own (the IDFormer was trained on one face at a time), then the per-photo ID
tokens are combined:

- `"mean"` (default): the element-wise mean of the (num_queries x output_dim) token sets. The
  FLUX cross-attentions then see exactly as many tokens as in training, with the same scale, and
  averaging keeps what the photos share (the identity) while pose, expression and lighting,
  which differ between photos, partly cancel. The mean of one set is that set.
- `"concat"`: the token sets side by side along the sequence (N x num_queries tokens). Every image
  query can attend to whichever photo suits it best, at the price of a token count the model
  never saw in training; useful when the references are very different views.

The unconditional ID (for true CFG) is the IDFormer applied to all-zero inputs, as in PuLID; it
is the same for any number of references (duplicated keys would not change the attention).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from generation.methods.base import InvalidWeights, ReferenceFace
from generation.pulid.bisenet import BiSeNet
from generation.pulid.encoders import IDFormer
from generation.pulid.eva_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EvaVisionTransformer
from generation.pulid.face import align_face, eva_input, face_features_image, limit_long_side

ID_MIX_MODES = ("mean", "concat")


def combine_id_tokens(tokens: list[torch.Tensor], mode: str = "mean") -> torch.Tensor:
    """Per-reference (1, Q, D) token sets → one (1, Q, D) (mean) or (1, N*Q, D) (concat) set."""
    if mode == "mean":
        return torch.stack(tokens).mean(dim=0)
    if mode == "concat":
        return torch.cat(tokens, dim=1)
    raise ValueError(f"unknown id_mix {mode!r}; use one of {', '.join(ID_MIX_MODES)}")


class PulidIdEncoder(nn.Module):
    """The face-side half of PuLID: BiSeNet parser, EVA02-CLIP vision tower, IDFormer."""

    def __init__(self, parser: BiSeNet, eva: EvaVisionTransformer, idformer: IDFormer):
        super().__init__()
        self.parser = parser
        self.eva = eva
        self.idformer = idformer

    @property
    def face_embedding_dim(self) -> int:
        """The face-embedder dimension the weights were trained for (512 = ArcFace for the real file)."""
        return self.idformer.id_input_dim - self.eva.embed_dim

    def _check_embedding(self, reference: ReferenceFace) -> None:
        dims = int(np.asarray(reference.embedding).size)
        if dims != self.face_embedding_dim:
            raise InvalidWeights(
                f"The PuLID weights expect a {self.face_embedding_dim}-d face embedding "
                f"(id_embedding_mapping.0.weight takes {self.idformer.id_input_dim} = {self.face_embedding_dim} + "
                f"{self.eva.embed_dim} EVA-CLIP inputs) but the references were embedded by '{reference.embedder}' "
                f"({dims}-d). Use the face embedder the weights were trained with (ArcFace for the released file), "
                "or rebuild the test weights with embedder_dims matching the active embedder.",
                details={"expected_dims": self.face_embedding_dim, "embedder": reference.embedder, "dims": dims},
            )

    @torch.no_grad()
    def eva_features(self, reference: ReferenceFace) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Aligned, parsed, grey face → (unit EVA-CLIP embedding (1, E), 5 hidden states)."""
        image, keypoints = limit_long_side(reference.image, reference.keypoints)
        aligned = align_face(image, keypoints)
        face = face_features_image(aligned, self.parser)
        dtype = self.eva.cls_token.dtype
        pixels = eva_input(face.to(self.eva.cls_token.device), self.eva.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        embedding, hidden_states = self.eva(pixels.to(dtype))
        return embedding / embedding.norm(dim=-1, keepdim=True), hidden_states

    @torch.no_grad()
    def encode(self, reference: ReferenceFace) -> torch.Tensor:
        """One reference face → ID tokens (1, num_queries, output_dim)."""
        self._check_embedding(reference)
        eva_embedding, hidden_states = self.eva_features(reference)
        face = torch.as_tensor(np.asarray(reference.embedding, dtype=np.float32)).reshape(1, -1)
        id_vector = torch.cat((face.to(eva_embedding), eva_embedding), dim=-1)
        return self.idformer(id_vector, hidden_states)

    @torch.no_grad()
    def encode_all(self, references: list[ReferenceFace], mode: str = "mean") -> torch.Tensor:
        """All references → one token set, combined by `mode` (see the module docstring)."""
        if mode not in ID_MIX_MODES:
            raise ValueError(f"unknown id_mix {mode!r}; use one of {', '.join(ID_MIX_MODES)}")
        return combine_id_tokens([self.encode(reference) for reference in references], mode)

    @torch.no_grad()
    def unconditional(self) -> torch.Tensor:
        """The IDFormer of zero inputs: PuLID's "no identity" tokens for the true-CFG negative pass."""
        param = self.idformer.latents
        grid_tokens = self.eva.pos_embed.shape[1]
        id_vector = torch.zeros(1, self.idformer.id_input_dim, device=param.device, dtype=param.dtype)
        hidden = [torch.zeros(1, grid_tokens, self.eva.width, device=param.device, dtype=param.dtype)] * len(
            self.eva.hidden_state_layers
        )
        return self.idformer(id_vector, hidden)
