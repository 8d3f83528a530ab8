"""LoRA training speed on a CUDA GPU through our trainer (`training.trainer`): SDXL UNet and FLUX transformer.

No real weights exist on our machines and FLOPs do not depend on weight values, so the denoisers are
full-size architectures with random weights in bf16, built on the GPU and handed to our trainer's
pipeline load (`train(..., components=...)`); the VAEs are full size too; the text encoders are small
(2 layers, the real output widths: they run once per caption, then leave the device). Everything else is
the production path: face-centred crops of a real photo at 1024², flips, cached latents and embeddings,
peft LoRA rank 16 on the attention projections, fused AdamW, the loss read back every `log_every` steps.

    python -m bench.training                        # CUDA: SDXL and FLUX, eager, then compiled blocks
    python -m bench.training --device cpu --tiny    # CPU smoke run of the same code path (seconds)
    python -m bench.training --only flux --variants eager,gc

Per variant: seconds per step (median of `--steps` after `--warmup` steps, the device synchronised at each
step boundary), peak GPU memory, data preparation (load + encode) and LoRA save time, and the projected wall
time of a 1000-step job. Also runs ../shared/tools/gpu_anchor.py (stock diffusers) for the reference figures.
Modules: `models` (the random full-size bases), `measure` (one timed run of our trainer), `__main__` (CLI,
report). Timings are reported, never asserted.
"""
