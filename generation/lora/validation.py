"""Check an uploaded LoRA before it is stored or loaded: safetensors only, size, and keys that fit the base model.

`inspect_lora(data, base_model, models_dir)` returns a `LoraInfo` (format, rank, target modules, ...) or raises
`InvalidLora` (an `AlkemyError`, code `invalid_lora`, HTTP 422, field `file`) saying what is wrong:

1. **Size**: at most `settings.ALKEMY_MAX_LORA_BYTES` (default 512 MB).
2. **Container**: a safetensors file, recognised from its 8-byte header length and JSON header (see
   `safetensors_header`); pickles and zips are refused from their first bytes and never unpickled.
3. **Key layout**: diffusers/peft keys (`unet.` / `transformer.` / `text_encoder.` / `text_encoder_2.` with
   `lora_A`/`lora_B` or `lora.down`/`lora.up`) or kohya keys (`lora_unet_...`, `lora_te1_...` with
   `.lora_down.weight` / `.lora_up.weight` / `.alpha`). Keys that name the other base's denoiser (an SDXL LoRA
   uploaded for FLUX) are refused with that diagnosis.
4. **Modules**: the keys are converted by diffusers' own loader code (`<Pipeline>.lora_state_dict`, the kohya
   conversion included) on meta tensors, then every LoRA pair must name a Linear/Conv2d module that exists in
   the base model (built on the meta device from its config) with matching input/output sizes. This is exactly
   what `load_lora_weights` will need, without reading the weights or loading the base.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alkemy.errors import AlkemyError
from generation.lora.bases import BASES, BaseSpec, base_spec, meta_modules, pipeline_class
from generation.lora.safetensors_header import NotSafetensors, SafetensorsHeader, read_header

DEFAULT_MAX_LORA_BYTES = 512 * 1024 * 1024

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
DIFFUSERS_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")

#: `<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_B.bias` once in peft naming
PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<kind>weight|bias)$")

#: block names that tell a UNet LoRA (SDXL / SD1.x) from a FLUX one in kohya keys
KOHYA_UNET_HINTS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
KOHYA_FLUX_HINTS = ("double_blocks", "single_blocks")


class InvalidLora(AlkemyError):
    """An uploaded or stored LoRA file that cannot be used with the chosen base model."""

    status_code = 422
    code = "invalid_lora"

    def __init__(self, message: str, *, details: dict | None = None, field: str = "file") -> None:
        super().__init__(message, code="invalid_lora", field=field, details=details, status_code=422)


@dataclass(frozen=True)
class LoraInfo:
    format: str  # "diffusers" | "kohya"
    base_model: str  # "sdxl" | "flux"
    rank: int  # the largest rank of any module (what hot-swapping must make room for)
    n_tensors: int
    #: "component.module" names in the diffusers model, e.g. "unet.down_blocks.1.attentions.0...attn1.to_q"
    target_modules: tuple[str, ...]
    components: tuple[str, ...]  # e.g. ("unet",) or ("unet", "text_encoder")
    size_bytes: int
    metadata: dict = field(default_factory=dict)  # the safetensors __metadata__ (training info, peft config)

    def modules_of(self, component: str) -> frozenset[str]:
        """Target module names inside one component (without the component prefix)."""
        prefix = component + "."
        return frozenset(name.removeprefix(prefix) for name in self.target_modules if name.startswith(prefix))


def max_lora_bytes() -> int:
    from django.conf import settings

    return int(getattr(settings, "ALKEMY_MAX_LORA_BYTES", DEFAULT_MAX_LORA_BYTES))


def inspect_lora(data: bytes | bytearray | memoryview | str | Path, base_model: str, models_dir: Path) -> LoraInfo:
    """Validate a LoRA (its bytes or its path) for `base_model`; return what it contains or raise InvalidLora."""
    if base_model not in BASES:
        raise InvalidLora(
            f"Unknown base model {base_model!r}; choose one of {', '.join(BASES)}.",
            field="base_model",
            details={"base_model": base_model},
        )
    spec = base_spec(base_model)
    if isinstance(data, (str, Path)):
        source: bytes | memoryview | Path = Path(data)
        size = source.stat().st_size
    else:
        source = memoryview(data)
        size = source.nbytes

    limit = max_lora_bytes()
    if size > limit:
        raise InvalidLora(
            f"The LoRA file is {size} bytes; the limit is {limit} bytes.",
            details={"size_bytes": size, "max_bytes": limit},
        )
    try:
        header = read_header(source, size)
    except NotSafetensors as error:
        raise InvalidLora(f"{error} Upload the LoRA as a .safetensors file.") from None
    if not header.tensors:
        raise InvalidLora("The safetensors file holds no tensors.")

    keys = list(header.tensors)
    lora_format = detect_format(keys)
    made_for = guess_base(keys, lora_format)
    if made_for is not None and made_for != base_model:
        raise InvalidLora(
            f"This LoRA was made for {BASES[made_for].label}, not {spec.label}: its keys name "
            f"{BASES[made_for].label} modules (e.g. {keys[0]!r}).",
            details={"base_model": base_model, "made_for": made_for, "example_key": keys[0]},
        )

    state_dict = _convert(header, spec, models_dir)
    targets, rank = _check_modules(state_dict, spec, models_dir)
    return LoraInfo(
        format=lora_format,
        base_model=base_model,
        rank=rank,
        n_tensors=len(keys),
        target_modules=tuple(sorted(targets)),
        components=tuple(c for c in spec.lora_components if any(t.startswith(c + ".") for t in targets)),
        size_bytes=size,
        metadata=dict(header.metadata),
    )


def detect_format(keys: list[str]) -> str:
    """ "kohya" or "diffusers" from the key names; InvalidLora for any other layout."""
    if all(key.startswith(KOHYA_PREFIXES) for key in keys):
        if not any(key.endswith(".lora_down.weight") for key in keys):
            raise InvalidLora("The file has kohya-style names but no `.lora_down.weight` tensors.")
        return "kohya"
    if all(key.startswith(DIFFUSERS_PREFIXES) for key in keys):
        return "diffusers"
    odd = next(key for key in keys if not key.startswith(KOHYA_PREFIXES + DIFFUSERS_PREFIXES))
    raise InvalidLora(
        f"Unrecognised LoRA key layout (e.g. {odd!r}): expected diffusers keys (unet./transformer./text_encoder.) "
        "or kohya keys (lora_unet_/lora_te1_/lora_te2_).",
        details={"example_key": odd},
    )


def guess_base(keys: list[str], lora_format: str) -> str | None:
    """Which base the denoiser keys were made for (None: only text-encoder keys, nothing to tell)."""
    if lora_format == "diffusers":
        if any(key.startswith("unet.") for key in keys):
            return "sdxl"
        if any(key.startswith("transformer.") for key in keys):
            return "flux"
        return None
    unet_keys = [key for key in keys if key.startswith("lora_unet_")]
    if any(hint in key for key in unet_keys for hint in KOHYA_FLUX_HINTS):
        return "flux"
    if any(hint in key for key in unet_keys for hint in KOHYA_UNET_HINTS):
        return "sdxl"
    return None


def _convert(header: SafetensorsHeader, spec: BaseSpec, models_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict in diffusers naming, as the pipeline's `lora_state_dict` converts it (kohya included).

    Weights are meta tensors (no data read); `.alpha` scalars are read for real because the conversions
    call `.item()` on them. If a conversion needs real values anyway, it is retried on the real tensors.
    """
    pipeline_cls = pipeline_class(spec)
    kwargs = {}
    if spec.key == "sdxl":
        # kohya SDXL LoRAs may use the original (sgm) block numbering; diffusers remaps it from the UNet config
        kwargs["unet_config"] = meta_modules(models_dir, spec.key, spec.denoiser)[""].config
    else:
        kwargs["return_alphas"] = True

    def run(state_dict):
        return pipeline_cls.lora_state_dict(state_dict, **kwargs)[0]

    state_dict = header.meta_tensors()
    for name in state_dict:
        if name.endswith(".alpha"):
            # kohya's alpha is one number per module; anything bigger is not a LoRA (and is not read into memory)
            shape = header.tensors[name].shape
            if math.prod(shape) != 1:
                raise InvalidLora(
                    f"The kohya alpha {name!r} must be a single number, not a tensor of shape {list(shape)}.",
                    details={"tensor": name},
                )
            state_dict[name] = header.read_tensor(name)
    try:
        return run(state_dict)
    except Exception as meta_error:  # noqa: BLE001 - diffusers raises ValueError/KeyError/NotImplementedError
        try:
            return run({name: header.read_tensor(name) for name in header.tensors})
        except Exception:  # noqa: BLE001
            raise InvalidLora(
                f"diffusers cannot convert this LoRA for {spec.label}: {meta_error}",
                details={"base_model": spec.key},
            ) from None


def _check_modules(state_dict: dict[str, torch.Tensor], spec: BaseSpec, models_dir: Path) -> tuple[set[str], int]:
    """Every LoRA pair must name an existing Linear/Conv2d of the base with matching sizes."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    problems: list[str] = []
    targets: set[str] = set()
    rank = 0
    for component in {key.split(".", 1)[0] for key in state_dict}:
        if component not in spec.lora_components:
            raise InvalidLora(
                f"The LoRA has weights for {component!r}, which {spec.label} LoRAs cannot target "
                f"(allowed: {', '.join(spec.lora_components)}).",
                details={"component": component, "base_model": spec.key},
            )
        part = {k.removeprefix(component + "."): v for k, v in state_dict.items() if k.startswith(component + ".")}
        if any("dora_scale" in key or "lora_magnitude_vector" in key for key in part):
            raise InvalidLora("DoRA LoRAs are not supported; upload a plain LoRA.")
        # the same key conversions diffusers applies right before peft loads the weights
        if component == spec.denoiser:
            if not any("lora_A" in key for key in part):
                part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        modules = meta_modules(models_dir, spec.key, component)

        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in part.items():
            match = PEFT_KEY.match(key)
            if match is None:
                problems.append(f"{component}.{key}: not a LoRA weight")
                continue
            if match["kind"] == "weight":
                pairs.setdefault(match["module"], {})[match["part"]] = tensor
        for name, pair in pairs.items():
            resolved = _resolve(name, modules)
            if resolved is None:
                problems.append(f"{component}.{name}: no such module in {spec.label}")
                continue
            problem = _shape_problem(modules[resolved], pair)
            if problem:
                problems.append(f"{component}.{name}: {problem}")
                continue
            targets.add(f"{component}.{resolved}")
            rank = max(rank, pair["lora_A"].shape[0])

    if problems:
        raise InvalidLora(
            f"The LoRA does not fit {spec.label}: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            details={"base_model": spec.key, "problems": problems[:20], "problem_count": len(problems)},
        )
    if not targets:
        raise InvalidLora(f"The file holds no LoRA weights for {spec.label}.", details={"base_model": spec.key})
    return targets, rank


def _resolve(name: str, modules: dict[str, torch.nn.Module]) -> str | None:
    """The module's name in the model: CLIP LoRAs may or may not carry the `text_model.` prefix."""
    for candidate in (name, f"text_model.{name}", name.removeprefix("text_model.")):
        if candidate in modules:
            return candidate
    return None


def _shape_problem(module: torch.nn.Module, pair: dict[str, torch.Tensor]) -> str | None:
    if set(pair) != {"lora_A", "lora_B"}:
        return f"has {', '.join(sorted(pair))} but needs lora_A and lora_B"
    down, up = pair["lora_A"], pair["lora_B"]
    if isinstance(module, torch.nn.Linear):
        fan_in, fan_out = module.in_features, module.out_features
    elif isinstance(module, torch.nn.Conv2d):
        fan_in, fan_out = module.in_channels // module.groups, module.out_channels
    else:
        return f"is a {type(module).__name__}, which LoRA weights cannot target"
    if (
        down.ndim < 2
        or up.ndim < 2
        or down.shape[1] != fan_in
        or up.shape[0] != fan_out
        or up.shape[1] != down.shape[0]
    ):
        return (
            f"LoRA shapes {list(down.shape)}/{list(up.shape)} do not fit a {fan_in}→{fan_out} "
            f"{type(module).__name__} (made for another model size?)"
        )
    return None
