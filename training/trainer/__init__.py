"""Our LoRA trainer for SDXL and FLUX.1-dev, on diffusers + peft.

One module per base reads top to bottom (`sdxl.py`, `flux.py`): load the pipeline, encode the
examples once (VAE latents and text embeddings cached; the VAE and text encoders then leave the
device), add the LoRA to the denoiser, and the loss of one training step. `loop.py` holds what both
share: the optimizer and learning-rate schedule, the step loop (cancel/progress callback between
steps, loss read back only every few steps so the device never waits for the host), checkpoints
(LoRA + optimizer + step + RNG) and saving the LoRA in the diffusers format `load_lora_weights` reads.

    config = TrainingConfig(base_model="sdxl", models_dir=..., steps=1000, rank=16, ...)
    result = train(config, examples, on_step=..., checkpoint=..., on_checkpoint=...)
    save_lora_file(path, config, result)
"""

from training.trainer.data import Example, face_crop, reference_examples
from training.trainer.loop import (
    TrainingConfig,
    TrainingResult,
    load_checkpoint,
    save_lora_file,
    train,
    trainer_for,
)

__all__ = [
    "Example",
    "TrainingConfig",
    "TrainingResult",
    "face_crop",
    "load_checkpoint",
    "reference_examples",
    "save_lora_file",
    "train",
    "trainer_for",
]
