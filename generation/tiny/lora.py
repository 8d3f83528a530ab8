"""Tiny LoRAs for the tiny base models (tests, demos): made with peft, saved the way diffusers saves them.

`write_peft_lora` adds a peft LoRA to the tiny UNet/transformer with random, non-zero A and B (a freshly
initialised LoRA has B = 0 and would change nothing) and saves it with the pipeline's `save_lora_weights`.
`write_kohya_lora` writes the same weights with kohya-ss key names (SDXL), the other common format.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generation.lora.bases import base_spec, pipeline_class

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: LoRA weights ~ N(0, 1/fan_in) times this: the LoRA visibly changes a 64x64 image without saturating it
WEIGHT_SCALE = 0.5


def peft_lora_state_dict(
    *,
    base_dir: Path,
    base_model: str,
    rank: int,
    seed: int,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    strength: float = WEIGHT_SCALE,
) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft state dict of the denoiser without component prefix, peft LoraConfig as a dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    spec = base_spec(base_model)
    denoiser = _load_denoiser(Path(base_dir), spec)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules), init_lora_weights=True)
    denoiser.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) * strength / fan_in**0.5)
    return get_peft_model_state_dict(denoiser), config.to_dict()


def write_peft_lora(
    path: Path,
    *,
    base_dir: Path,
    base_model: str,
    rank: int,
    seed: int,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
    strength: float = WEIGHT_SCALE,
) -> Path:
    """A diffusers-format LoRA safetensors at `path` for the tiny base in `base_dir`."""
    spec = base_spec(base_model)
    state_dict, config = peft_lora_state_dict(
        base_dir=base_dir,
        base_model=base_model,
        rank=rank,
        seed=seed,
        alpha=alpha,
        target_modules=target_modules,
        strength=strength,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class(spec).save_lora_weights(
        path.parent,
        weight_name=path.name,
        **{f"{spec.denoiser}_lora_layers": state_dict, f"{spec.denoiser}_lora_adapter_metadata": config},
    )
    return path


def write_kohya_lora(
    path: Path,
    *,
    base_dir: Path,
    base_model: str = "sdxl",
    rank: int,
    seed: int,
    alpha: float | None = None,
    target_modules: tuple[str, ...] = DEFAULT_TARGETS,
) -> Path:
    """The same LoRA as `write_peft_lora` with the same arguments, in kohya-ss naming (SDXL UNet only).

    kohya names a module by its dotted path with "_" for ".", prefixed `lora_unet_`; A/B are
    `lora_down`/`lora_up`, and `alpha` is stored per module (scale = alpha / rank, as in peft).
    """
    from safetensors.torch import save_file

    if base_model != "sdxl":
        raise ValueError("tiny kohya LoRAs are written for SDXL only")
    state_dict, _ = peft_lora_state_dict(
        base_dir=base_dir, base_model=base_model, rank=rank, seed=seed, alpha=alpha, target_modules=target_modules
    )
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, part, _ = key.rsplit(".", 2)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = tensor.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha or rank))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return path


def _load_denoiser(base_dir: Path, spec):
    import diffusers

    cls = diffusers.UNet2DConditionModel if spec.denoiser == "unet" else diffusers.FluxTransformer2DModel
    return cls.from_pretrained(base_dir / spec.denoiser)
