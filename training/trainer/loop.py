"""What the SDXL and FLUX trainers share: LoRA set-up, optimizer, schedule, the step loop, checkpoints, saving.

The step loop never waits for the device on its own account: the loss of each step is added to a
running sum on the device and read back (one host sync) only every `log_every` steps, at checkpoints
and at the end. Between steps `on_step(step, total, loss_or_None)` runs; it may raise to stop the run
(cancel, lost lease, timeout). A checkpoint holds everything the rest of the run depends on (LoRA
weights, AdamW moments, the step, both random generators, the loss history), so a run resumed from
it ends with the same weights an uninterrupted run would have (bit for bit on the CPU).
"""

from __future__ import annotations

import importlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKPOINT_FORMAT = 1
WEIGHT_DECAY = 1e-4
#: the trainer class of each base model
TRAINERS = {"sdxl": "training.trainer.sdxl.SDXLTrainer", "flux": "training.trainer.flux.FluxTrainer"}

StepCallback = Callable[[int, int, float | None], None]
CheckpointCallback = Callable[[int, dict], None]


@dataclass
class TrainingConfig:
    base_model: str  # "sdxl" | "flux"
    models_dir: Path
    steps: int = 1000
    rank: int = 16
    alpha: float | None = None  # None: = rank
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine", both after a linear warm-up
    warmup_steps: int = 0
    resolution: int = 1024
    seed: int = 0
    checkpoint_every: int = 250  # 0: no checkpoints
    log_every: int = 10  # loss read back from the device every this many steps
    gradient_checkpointing: bool = False
    compile_blocks: bool = False  # torch.compile each repeated transformer block
    device: str | None = None  # None: cuda when available, else cpu
    dtype: torch.dtype | None = None  # frozen base: None → bf16 on CUDA, fp32 on CPU
    lora_dtype: torch.dtype = torch.float32  # the trained weights (bf16: "bf16 throughout", benchmarks)

    def __post_init__(self) -> None:
        from generation.methods.base import LoadOptions

        options = LoadOptions.for_device(self.device)
        self.device = options.device
        self.dtype = self.dtype or options.dtype
        self.alpha = float(self.rank if self.alpha is None else self.alpha)
        self.models_dir = Path(self.models_dir)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


@dataclass
class TrainingResult:
    state_dict: dict[str, torch.Tensor]  # the LoRA in peft naming (no component prefix), fp32 on the CPU
    target_modules: tuple[str, ...]  # what the LoRA was put on (saved in the file's adapter metadata)
    steps: int
    final_loss: float | None
    loss_history: list[list[float]]
    resumed_from_step: int | None
    steps_per_second: float | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, prepare, train


def trainer_for(config: TrainingConfig):
    """A fresh trainer of `config.base_model` (nothing loaded yet)."""
    module, name = TRAINERS[config.base_model].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(config)


def train(
    config: TrainingConfig,
    examples: list,
    *,
    on_step: StepCallback | None = None,
    checkpoint: dict | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    components: dict | None = None,
) -> TrainingResult:
    """Load the base, encode `examples` once, add the LoRA and train it for `config.steps` steps.

    With `checkpoint` (from `load_checkpoint`) the run continues after the checkpoint's step. `components`
    are pipeline components used instead of the folder's (the benchmark's random full-size denoisers).
    """
    if config.on_cuda:
        # torch's cuDNN attention backend crashed in FLUX's backward pass (illegal memory access)
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
    trainer = trainer_for(config)
    clock = Clock(config)
    trainer.load(**(components or {}))
    load_seconds = clock.lap()
    trainer.cache(examples)
    prepare_seconds = clock.lap()
    trainer.add_lora()
    result = optimize(trainer, config, on_step=on_step, checkpoint=checkpoint, on_checkpoint=on_checkpoint)
    result.timings = {"load": round(load_seconds, 3), "prepare": round(prepare_seconds, 3), **result.timings}
    return result


# -- LoRA on the denoiser ---------------------------------------------------------------------------------


def lora_config(config: TrainingConfig, target_modules: tuple[str, ...]):
    from peft import LoraConfig

    # gaussian A, zero B: the LoRA starts as the identity and the first steps see the plain base model
    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=list(target_modules)
    )


def add_lora(denoiser: torch.nn.Module, config: TrainingConfig, target_modules: tuple[str, ...]) -> None:
    """Freeze the base, add the LoRA (its weights in `config.lora_dtype`, fp32 by default), set up speed options."""
    torch.manual_seed(config.seed)  # the gaussian init of lora_A
    denoiser.requires_grad_(False)
    denoiser.add_adapter(lora_config(config, target_modules))
    for param in denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.to(config.lora_dtype)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if config.compile_blocks:
        from generation.lora.adapters import _compile_blocks

        _compile_blocks(denoiser)
    denoiser.train()


def lora_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().float().cpu().clone() for key, value in get_peft_model_state_dict(denoiser).items()}


def save_lora_file(path: Path, config: TrainingConfig, result: TrainingResult) -> Path:
    """The trained LoRA as diffusers saves it (`<denoiser>.…lora_A.weight`), which `load_lora_weights` reads."""
    from generation.lora.bases import base_spec, pipeline_class

    spec = base_spec(config.base_model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class(spec).save_lora_weights(
        path.parent,
        weight_name=path.name,
        **{
            f"{spec.denoiser}_lora_layers": result.state_dict,
            f"{spec.denoiser}_lora_adapter_metadata": lora_config(config, result.target_modules).to_dict(),
        },
    )
    return path


# -- optimisation -----------------------------------------------------------------------------------------


def make_optimizer(params: list[torch.nn.Parameter], config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all LoRA tensors) on CUDA."""
    return torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=WEIGHT_DECAY, fused=True if config.on_cuda else None
    )


def learning_rate_at(step: int, config: TrainingConfig) -> float:
    """Learning rate of 0-based `step`: linear warm-up, then constant or cosine down to 0."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.learning_rate


def optimize(
    trainer,
    config: TrainingConfig,
    *,
    on_step: StepCallback | None = None,
    checkpoint: dict | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainingResult:
    """Run the training steps after `checkpoint` (or from 0) up to `config.steps` on a prepared trainer."""
    denoiser = trainer.denoiser
    params = [param for param in denoiser.parameters() if param.requires_grad]
    optimizer = make_optimizer(params, config)
    picker = torch.Generator("cpu").manual_seed(config.seed)  # which example each step trains on
    noise = torch.Generator(config.device).manual_seed(config.seed + 1)  # noise and timesteps, on the device
    done, history = 0, []
    if checkpoint is not None:
        done, history = restore_checkpoint(checkpoint, denoiser=denoiser, optimizer=optimizer, picker=picker,
                                           noise=noise)  # fmt: skip

    clock = Clock(config)
    running, since_log = torch.zeros((), device=config.device), 0
    for step in range(done + 1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step - 1, config)
        index = int(torch.randint(trainer.num_examples, (1,), generator=picker))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=config.on_cuda):
            loss = trainer.loss(index, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        since_log += 1

        checkpoint_due = bool(config.checkpoint_every) and step % config.checkpoint_every == 0 and step < config.steps
        logged = None
        if step % config.log_every == 0 or step == config.steps or checkpoint_due:
            logged = float(running / since_log)  # the only host sync of the loop
            history.append([step, round(logged, 6)])
            running.zero_()
            since_log = 0
        if on_step is not None:
            on_step(step, config.steps, logged)
        if checkpoint_due and on_checkpoint is not None:
            on_checkpoint(step, checkpoint_state(config, step, denoiser=denoiser, optimizer=optimizer,
                                                 picker=picker, noise=noise, history=history))  # fmt: skip
    train_seconds = clock.lap()
    return TrainingResult(
        state_dict=lora_state_dict(denoiser),
        target_modules=tuple(trainer.target_modules),
        steps=config.steps,
        final_loss=history[-1][1] if history else None,
        loss_history=history,
        resumed_from_step=done if checkpoint is not None else None,
        steps_per_second=round((config.steps - done) / train_seconds, 4) if train_seconds > 0 else None,
        timings={"train": round(train_seconds, 3)},
    )


@torch.no_grad()
def evaluation_loss(trainer, *, seed: int = 0, repeats: int = 4) -> float:
    """The training objective over every example with fixed noise and timesteps: comparable across runs."""
    generator = torch.Generator(trainer.config.device).manual_seed(seed)
    losses = [trainer.loss(index, generator) for _ in range(repeats) for index in range(trainer.num_examples)]
    return float(torch.stack(losses).mean())


# -- checkpoints ------------------------------------------------------------------------------------------


def checkpoint_state(config: TrainingConfig, step: int, *, denoiser, optimizer, picker, noise, history) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "base_model": config.base_model,
        "rank": config.rank,
        "step": step,
        "lora": lora_state_dict(denoiser),
        "optimizer": optimizer.state_dict(),
        "rng": {"picker": picker.get_state(), "noise": noise.get_state()},
        "loss_history": [list(item) for item in history],
    }


def checkpoint_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes, config: TrainingConfig) -> dict | None:
    """A checkpoint written by `checkpoint_state` for this kind of run; None when it does not fit."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # tensors only, nothing unpickled
    fits = (
        state.get("format") == CHECKPOINT_FORMAT
        and state.get("base_model") == config.base_model
        and state.get("rank") == config.rank
        and 0 < int(state.get("step", 0)) < config.steps
    )
    return state if fits else None


def restore_checkpoint(state: dict, *, denoiser, optimizer, picker, noise) -> tuple[int, list]:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(denoiser, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    picker.set_state(state["rng"]["picker"])
    noise.set_state(state["rng"]["noise"])
    return int(state["step"]), [list(item) for item in state["loss_history"]]


class Clock:
    """Wall-clock laps that include the device's queued work (synchronises on CUDA)."""

    def __init__(self, config: TrainingConfig) -> None:
        self.on_cuda = config.on_cuda
        self.last = time.monotonic()

    def lap(self) -> float:
        if self.on_cuda:
            torch.cuda.synchronize()
        now = time.monotonic()
        seconds, self.last = now - self.last, now
        return seconds
