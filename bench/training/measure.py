"""One timed training run of our trainer: per-step times, peak memory, preparation and save time."""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: skimage.data.astronaut(): the face box dlib finds (as in bench/gpu_methods.py)
ASTRONAUT_BOX = (179.0, 83.0, 266.0, 170.0)
PROJECTED_STEPS = 1000


@dataclass
class Variant:
    name: str
    compile_blocks: bool = False
    gradient_checkpointing: bool = False
    lora_bf16: bool = False  # LoRA weights (and AdamW state) in bf16 too: "bf16 throughout"


VARIANTS = {
    "eager": Variant("eager"),
    "compiled": Variant("compiled", compile_blocks=True),
    "gc": Variant("gc", gradient_checkpointing=True),
    "compiled_gc": Variant("compiled_gc", compile_blocks=True, gradient_checkpointing=True),
    "bf16": Variant("bf16", lora_bf16=True),
    "compiled_bf16": Variant("compiled_bf16", compile_blocks=True, lora_bf16=True),
}


def examples(resolution: int, references: int) -> list:
    """`references` head-and-shoulders crops of a real photo (shifted a little each) and their flips."""
    from PIL import Image
    from skimage import data

    from training.trainer.data import Example, face_crop, with_flips

    photo = Image.fromarray(data.astronaut())
    x1, y1, x2, y2 = ASTRONAUT_BOX
    crops = [
        Example(face_crop(photo, (x1 + 4 * i, y1, x2 + 4 * i, y2), resolution), "a photo of ohwx_eileen person")
        for i in range(references)
    ]
    return with_flips(crops)


def run(*, base_model: str, models_dir: Path, components: dict, variant: Variant, device: str, resolution: int,
        rank: int, warmup: int, steps: int, references: int, log_every: int) -> dict:  # fmt: skip
    """Train `warmup + steps` steps with our trainer; time each step at its boundary (device synchronised)."""
    from training.trainer import save_lora_file
    from training.trainer.loop import TrainingConfig, train

    config = TrainingConfig(
        base_model=base_model, models_dir=models_dir, steps=warmup + steps, rank=rank, learning_rate=1e-4,
        resolution=resolution, checkpoint_every=0, log_every=log_every, device=device,
        compile_blocks=variant.compile_blocks, gradient_checkpointing=variant.gradient_checkpointing,
        lora_dtype=torch.bfloat16 if variant.lora_bf16 else torch.float32,
    )  # fmt: skip
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    marks: list[float] = []

    def on_step(step: int, total: int, loss: float | None) -> None:
        if on_cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    started = time.perf_counter()
    result = train(config, examples(resolution, references), on_step=on_step, components=components)
    wall = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        saving = time.perf_counter()
        path = save_lora_file(Path(scratch) / "lora.safetensors", config, result)
        save_seconds = time.perf_counter() - saving
        lora_mb = path.stat().st_size / 2**20

    intervals = [b - a for a, b in zip(marks, marks[1:], strict=False)][max(warmup - 1, 0) :]
    per_step = statistics.median(intervals) if intervals else None
    first_steps = marks[warmup - 1] - (started + result.timings["load"] + result.timings["prepare"]) if warmup else 0
    prepare = result.timings["load"] + result.timings["prepare"]
    report = {
        "variant": variant.name,
        "s_per_step_median": round(per_step, 4) if per_step else None,
        "s_per_step_min": round(min(intervals), 4) if intervals else None,
        "timed_steps": len(intervals),
        "warmup_steps_s": round(first_steps, 2),  # includes torch.compile's first calls
        "load_s": result.timings["load"],
        "prepare_s": result.timings["prepare"],
        "save_s": round(save_seconds, 3),
        "lora_mb": round(lora_mb, 1),
        "final_loss": result.final_loss,
        "wall_s": round(wall, 2),
    }
    if per_step:
        report["projected_1000_steps_min"] = round(
            (prepare + first_steps + (PROJECTED_STEPS - warmup) * per_step + save_seconds) / 60, 2
        )
    if on_cuda:
        report["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return report
