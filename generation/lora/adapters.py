"""LoRA slots on one warm pipeline, swapped between jobs without reloading the base model.

Hot-swap (diffusers `enable_lora_hotswap` + `load_lora_weights(..., hotswap=True)`, peft's
`hotswap_adapter_from_state_dict` underneath) copies a new LoRA's weights *into the tensors of an already
loaded adapter*: no module is added or replaced, so the base stays in memory untouched and a `torch.compile`d
denoiser is not recompiled. Constraints, and what happens when a LoRA breaks them:

* **Rank**: before the first load, `enable_lora_hotswap(target_rank=R)` makes diffusers pad the first
  adapter's A/B to rank R and turn its scaling into a tensor; afterwards any LoRA of rank ≤ R is copied into
  the padded tensors (the extra rows/columns are zero, so the result is the same as loading it alone). A LoRA
  of rank > R cannot fit: the slot is **reloaded** (unload + fresh load, target raised to that rank), which
  changes the module shapes, i.e. recompiles a compiled model. R is `settings.ALKEMY_LORA_MAX_RANK` (default
  128); set it to the largest rank you accept.
* **Target modules**: the new LoRA must target the same modules as the slot's first LoRA, or a subset (peft
  zeroes the modules it does not have). One that targets other modules → **reload**.
* **Text encoders**: diffusers cannot hot-swap text-encoder LoRA weights; a LoRA with text-encoder weights
  (or replacing one that had some) → **reload**.
* **Config**: peft refuses to hot-swap across different `alpha_pattern`/dropout/DoRA/rsLoRA settings
  (per-module alphas that differ); diffusers raises → the slot is cleaned up and **reloaded**.

Every reload is logged and counted (`reloads`); the base pipeline is never reloaded (`LoraMethod.base_loads`).

Slots are fixed adapter names: "character" for the character LoRA, "style" for an optional style LoRA. Each
slot is hot-swapped independently; a job without a style LoRA just deactivates the "style" slot.

**Scales**: peft's `set_scale` (used by `set_adapters`) recomputes `weight * lora_alpha / r` from the *first*
LoRA loaded into the slot, which is wrong after a hot-swap to a LoRA with another alpha/rank, and it replaces
the scaling tensor with a Python float (a recompile under torch.compile). So after every load we record each
layer's own scaling (alpha/rank of the LoRA now in it) and scaling tensor, and `activate` writes
`weight × that` back into the same tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generation.lora.bases import BaseSpec
from generation.lora.validation import LoraInfo

logger = logging.getLogger(__name__)

CHARACTER_SLOT = "character"
STYLE_SLOT = "style"


@dataclass
class LayerScale:
    module: torch.nn.Module  # a peft LoraLayer of the denoiser
    base: float  # alpha / rank of the LoRA currently in the slot, at weight 1
    tensor: torch.Tensor | None  # the scaling tensor diffusers' hot-swap preparation created (kept in place)


@dataclass
class Slot:
    lora_id: str
    info: LoraInfo
    #: denoiser modules that carry this slot's LoRA layers (from the fresh load; hot-swaps never add any)
    layer_modules: frozenset[str]
    scales: list[LayerScale] = field(default_factory=list)


class AdapterManager:
    """The LoRA slots of one pipeline: load, hot-swap (or reload when hot-swap cannot apply), activate."""

    def __init__(self, pipeline, spec: BaseSpec, *, target_rank: int, compile_blocks: bool = False):
        self.pipeline = pipeline
        self.spec = spec
        self.target_rank = int(target_rank)
        self.compile_blocks = compile_blocks
        self.slots: dict[str, Slot] = {}
        # counters: tests and metrics tell a hot-swap from a reload
        self.fresh_loads = 0
        self.hotswaps = 0
        self.reloads = 0
        self._compiled = False

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.spec.denoiser)

    def ensure(self, slot: str, lora_id: str, path: Path, info: LoraInfo) -> str:
        """Make `slot` hold the LoRA `lora_id`; returns "kept", "loaded", "hotswapped" or "reloaded"."""
        current = self.slots.get(slot)
        if current is not None and current.lora_id == lora_id:
            return "kept"
        if current is None:
            self._load_fresh(slot, lora_id, path, info)
            return "loaded"

        reason = self.hotswap_blocker(current, info)
        if reason is None:
            try:
                self.pipeline.load_lora_weights(str(path), adapter_name=slot, hotswap=True)
            except Exception as error:  # noqa: BLE001 - peft/diffusers raise ValueError or RuntimeError
                reason = f"diffusers refused the hot-swap ({error})"
            else:
                self._record(slot, lora_id, info, current.layer_modules)
                self.hotswaps += 1
                return "hotswapped"

        logger.warning("LoRA %s cannot be hot-swapped into slot %r: %s; reloading the slot", lora_id, slot, reason)
        self.unload(slot)
        self._load_fresh(slot, lora_id, path, info)
        self.reloads += 1
        return "reloaded"

    def hotswap_blocker(self, current: Slot, info: LoraInfo) -> str | None:
        """Why `info` cannot be hot-swapped into the slot holding `current` (None: it can)."""
        denoiser_only = (self.spec.denoiser,)
        if info.components != denoiser_only or current.info.components != denoiser_only:
            return "text-encoder LoRA weights cannot be hot-swapped"
        if info.rank > self.target_rank:
            return f"its rank {info.rank} is above the hot-swap target rank {self.target_rank}"
        extra = info.modules_of(self.spec.denoiser) - current.layer_modules
        if extra:
            return f"it targets {len(extra)} module(s) the slot has no LoRA layers for (e.g. {min(extra)})"
        return None

    def unload(self, slot: str) -> None:
        """Remove the slot's adapter from every component (the LoRA wrapper layers stay, empty)."""
        if slot in self.slots:
            self.pipeline.delete_adapters([slot])
            del self.slots[slot]

    def activate(self, weights: dict[str, float]) -> None:
        """Use exactly these slots with these weights (other loaded slots are switched off)."""
        names = list(weights)
        # diffusers activates the adapters on every component (and scales the text encoders correctly)...
        self.pipeline.set_adapters(names, adapter_weights=[float(weights[name]) for name in names])
        # ...then the denoiser's scalings are set from each layer's own alpha/rank, into the same tensors.
        with torch.no_grad():
            for name in names:
                for layer in self.slots[name].scales:
                    value = float(weights[name]) * layer.base
                    if layer.tensor is not None:
                        layer.tensor.fill_(value)
                        layer.module.scaling[name] = layer.tensor
                    else:
                        layer.module.scaling[name] = value

    def _load_fresh(self, slot: str, lora_id: str, path: Path, info: LoraInfo) -> None:
        # Room for this LoRA: a larger one raises the target for all later swaps into this slot.
        self.target_rank = max(self.target_rank, info.rank)
        # Adding a second slot (or reloading one) changes the modules anyway; "error" would refuse it because
        # another adapter is already loaded, so the compile check is only kept for the very first adapter.
        first = not getattr(self.denoiser, "peft_config", None)
        self.pipeline.enable_lora_hotswap(target_rank=self.target_rank, check_compiled="error" if first else "ignore")
        self.pipeline.load_lora_weights(str(path), adapter_name=slot)
        layer_modules = info.modules_of(self.spec.denoiser)
        self._record(slot, lora_id, info, layer_modules)
        self.fresh_loads += 1
        if self.compile_blocks and not self._compiled:
            # After the first adapter: compiled blocks then see the padded LoRA layers and tensor scalings,
            # so later hot-swaps (same shapes, in-place copies) do not recompile.
            _compile_blocks(self.denoiser)
            self._compiled = True

    def _record(self, slot: str, lora_id: str, info: LoraInfo, layer_modules: frozenset[str]) -> None:
        """Remember each layer's scaling right after a load: alpha/rank of the LoRA just loaded, weight 1."""
        from peft.tuners.lora import LoraLayer

        scales = []
        for module in self.denoiser.modules():
            if isinstance(module, LoraLayer) and slot in module.scaling:
                value = module.scaling[slot]
                tensor = value if isinstance(value, torch.Tensor) else None
                scales.append(LayerScale(module, float(value), tensor))
        self.slots[slot] = Slot(lora_id, info, layer_modules, scales)


def _compile_blocks(denoiser: torch.nn.Module) -> None:
    """torch.compile each repeated transformer block in place (most of the FLOPs, no graph breaks)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    for module in denoiser.modules():
        if isinstance(module, (BasicTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)):
            module.compile()
