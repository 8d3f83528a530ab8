"""Inject PuLID's ID tokens into diffusers' `FluxTransformer2DModel` with forward hooks.

PuLID-FLUX adds `id_weight * pulid_ca[k](id_tokens, img)` to the image stream after every 2nd
double-stream block (0, 2, 4, ...) and every 4th single-stream block (0, 4, 8, ...); for FLUX.1-dev
(19 + 38 blocks) that is 10 + 10 = 20 cross-attentions. In diffusers both block kinds return
`(encoder_hidden_states, hidden_states)` with the image tokens in `hidden_states` (the single
blocks split text and image back apart), so a forward hook that rewrites the second element is
exactly the original insertion point, and the transformer itself stays stock.

The CA modules are registered as `transformer.pulid_ca`, so `.to()`, dtype casts and model CPU
offload move them with the transformer. What to inject is read from a small mutable
`IdInjection` at call time: the method sets it before a generation and clears it afterwards.
With `block.compile()` the hook is traced into the block's graph; torch.compile guards on the
Python values it reads (active or not, `weight`), so a new id_weight costs one recompile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4


def num_ca_modules(num_double: int, num_single: int) -> int:
    """ceil(19/2) + ceil(38/4) = 20 for FLUX.1-dev."""
    return math.ceil(num_double / DOUBLE_INTERVAL) + math.ceil(num_single / SINGLE_INTERVAL)


@dataclass
class IdInjection:
    """What the hooks add right now.

    `tokens[pass_index]` are the ID tokens of the current transformer call: the pipeline calls the
    transformer once per step (index 0, the conditional pass) or twice with true CFG (index 1 is
    the negative-prompt pass, which gets the unconditional ID). `step` counts finished steps.
    """

    tokens: list[torch.Tensor] = field(default_factory=list)
    weight: float = 1.0
    start_step: int = 0
    step: int = 0
    pass_index: int = 0

    @property
    def active(self) -> bool:
        return bool(self.tokens) and self.weight != 0 and self.step >= self.start_step

    def current(self) -> torch.Tensor:
        return self.tokens[min(self.pass_index, len(self.tokens) - 1)]

    def reset(self, tokens: list[torch.Tensor] | None = None, weight: float = 1.0, start_step: int = 0) -> None:
        self.tokens, self.weight, self.start_step = list(tokens or []), weight, start_step
        self.step = self.pass_index = 0

    def step_done(self) -> None:
        self.step += 1
        self.pass_index = 0


def _ca_hook(ca: nn.Module, injection: IdInjection):
    def hook(block: nn.Module, args, output):
        if not injection.active:
            return output
        encoder_hidden_states, hidden_states = output
        id_tokens = injection.current().to(hidden_states.device, hidden_states.dtype)
        if id_tokens.shape[0] != hidden_states.shape[0]:
            id_tokens = id_tokens.expand(hidden_states.shape[0], -1, -1)
        return encoder_hidden_states, hidden_states + injection.weight * ca(id_tokens, hidden_states)

    return hook


def attach_pulid(transformer: nn.Module, ca_modules: nn.ModuleList, injection: IdInjection) -> list:
    """Register `ca_modules` as `transformer.pulid_ca` and hook them after their blocks; returns the handles."""
    double_blocks = transformer.transformer_blocks
    single_blocks = transformer.single_transformer_blocks
    targets = [block for i, block in enumerate(double_blocks) if i % DOUBLE_INTERVAL == 0]
    targets += [block for i, block in enumerate(single_blocks) if i % SINGLE_INTERVAL == 0]
    if len(targets) != len(ca_modules):
        raise ValueError(f"{len(ca_modules)} PuLID cross-attentions for {len(targets)} insertion points")
    transformer.pulid_ca = ca_modules
    handles = [
        block.register_forward_hook(_ca_hook(ca, injection)) for block, ca in zip(targets, ca_modules, strict=True)
    ]

    def next_pass(module, args, output):
        # The conditional and the (true-CFG) negative pass alternate within a denoising step; the
        # denoising loop resets the counter after each step (`IdInjection.step_done`).
        injection.pass_index += 1

    handles.append(transformer.register_forward_hook(next_pass))
    return handles
