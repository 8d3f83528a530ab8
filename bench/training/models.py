"""The base-model folders and random full-size denoisers, reusing bench/gpu_methods.py's builder."""

from __future__ import annotations

from pathlib import Path

from bench.gpu_methods import Builder, full_sizes, tiny_sizes


def builder(models_dir: Path, *, tiny: bool, device: str, dtype) -> Builder:
    """Writes `<models_dir>/<base>/` with full-size (or tiny) VAE, small text encoders, denoiser config only."""
    return Builder(models_dir, tiny_sizes() if tiny else full_sizes(), device, dtype, "memory")


def write_base(build: Builder, base_model: str) -> None:
    if base_model == "flux":
        build.write_flux()
    else:
        build.write_sdxl()


def random_denoiser(build: Builder, base_model: str) -> dict:
    """{"transformer" | "unet": a fresh random denoiser on the device}: the components `train` takes."""
    if base_model == "flux":
        return {"transformer": build.flux_transformer()}
    return {"unet": build.sdxl_unet()}
