"""LoRA generation on tiny SDXL / FLUX weights (CPU): effect, hot-swap without base reload, kohya, style, trigger
token, upload validation."""

from __future__ import annotations

import io
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from generation.lora import InvalidLora, inspect_lora
from generation.methods.base import GenerationFailed, GenerationRequest, LoadOptions, ModelMissing
from generation.methods.lora import LoraMethod, with_trigger
from generation.model_registry import component_path
from generation.tiny.base_models import write_flux, write_sdxl
from generation.tiny.lora import write_kohya_lora, write_peft_lora

STEPS = 2
SEED = 7
SIZE = 64
TARGET_RANK = 8


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    write_sdxl(component_path(directory, "sdxl"))
    write_flux(component_path(directory, "flux"))
    return directory


@pytest.fixture(scope="module")
def loras(models_dir, tmp_path_factory):
    """Tiny LoRAs by name: SDXL a/b (rank 4), c (rank 2, alpha 1), big (rank 16), style, kohya twin of a; FLUX."""
    directory = tmp_path_factory.mktemp("loras")
    sdxl, flux = component_path(models_dir, "sdxl"), component_path(models_dir, "flux")
    paths = {
        "a": write_peft_lora(directory / "a.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=1),
        "b": write_peft_lora(directory / "b.safetensors", base_dir=sdxl, base_model="sdxl", rank=4, seed=2),
        "c": write_peft_lora(directory / "c.safetensors", base_dir=sdxl, base_model="sdxl", rank=2, seed=3, alpha=1),
        "big": write_peft_lora(directory / "big.safetensors", base_dir=sdxl, base_model="sdxl", rank=16, seed=4),
        "style": write_peft_lora(
            directory / "style.safetensors",
            base_dir=sdxl,
            base_model="sdxl",
            rank=4,
            seed=5,
            target_modules=("to_k", "to_v"),
        ),
        "a_kohya": write_kohya_lora(directory / "a_kohya.safetensors", base_dir=sdxl, rank=4, seed=1),
        # the tiny FLUX VAE damps changes: a stronger LoRA keeps the effect well above rounding
        "flux": write_peft_lora(
            directory / "flux.safetensors", base_dir=flux, base_model="flux", rank=4, seed=6, strength=2.0
        ),
    }
    return paths


@pytest.fixture(scope="module")
def method(models_dir) -> LoraMethod:
    return LoraMethod(models_dir, LoadOptions(), target_rank=TARGET_RANK)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def generate(method: LoraMethod, lora, *, prompt="a photo", on_step=None, size=(SIZE, SIZE), **params) -> np.ndarray:
    params = {"base_model": "sdxl", "lora_path": str(lora), "lora_id": lora.stem, **params}
    request = GenerationRequest(
        references=[], prompt=prompt, width=size[0], height=size[1], steps=STEPS, seed=SEED, params=params
    )
    return pixels(method.generate(request, on_step)[0])


@pytest.fixture(scope="module")
def stock_pipeline(models_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(component_path(models_dir, "sdxl"), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_sdxl(pipe, lora=None) -> np.ndarray:
    """The stock diffusers pipeline with `lora` loaded alone (unloaded after): the reference output."""
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    try:
        image = pipe(
            prompt="a photo",
            width=SIZE,
            height=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=LoraMethod.default_guidance,
            generator=torch.Generator().manual_seed(SEED),
        ).images[0]
    finally:
        if lora is not None:
            pipe.unload_lora_weights()  # back to the plain base, as freshly loaded
    return pixels(image)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# -- generation --------------------------------------------------------------------------------------------


def test_lora_changes_the_image_and_scale_zero_is_the_base_model(method, stock_pipeline, loras):
    base = stock_sdxl(stock_pipeline)
    with_lora = generate(method, loras["a"])
    assert max_diff(with_lora, base) > 5
    assert max_diff(generate(method, loras["a"], lora_scale=0.0), base) <= 1


def test_hotswap_gives_each_loras_own_output_without_reloading_the_base(method, stock_pipeline, loras):
    generate(method, loras["a"])
    adapters = method.adapters["sdxl"]
    unet, base_loads, hotswaps = method.pipelines["sdxl"].unet, method.base_loads, adapters.hotswaps

    # b: same rank as a; c: smaller rank than the target and another alpha (its scale must follow it)
    outputs = {name: generate(method, loras[name]) for name in ("b", "c")}
    assert adapters.hotswaps == hotswaps + 2
    assert adapters.reloads == 0
    assert method.base_loads == base_loads
    assert method.pipelines["sdxl"].unet is unet
    for name, output in outputs.items():
        assert max_diff(output, stock_sdxl(stock_pipeline, loras[name])) <= 1, name
    assert max_diff(outputs["b"], outputs["c"]) > 5


def test_a_lora_above_the_target_rank_reloads_the_slot_not_the_base(method, stock_pipeline, loras):
    generate(method, loras["a"])
    adapters = method.adapters["sdxl"]
    base_loads, reloads = method.base_loads, adapters.reloads
    output = generate(method, loras["big"])
    assert adapters.reloads == reloads + 1
    assert method.base_loads == base_loads
    assert max_diff(output, stock_sdxl(stock_pipeline, loras["big"])) <= 1


def test_kohya_file_gives_the_same_image_as_its_diffusers_twin(method, models_dir, loras):
    info = inspect_lora(loras["a_kohya"], "sdxl", models_dir)
    assert (info.format, info.rank, info.components) == ("kohya", 4, ("unet",))
    assert info.target_modules == inspect_lora(loras["a"], "sdxl", models_dir).target_modules
    assert max_diff(generate(method, loras["a_kohya"]), generate(method, loras["a"])) <= 1


def test_style_lora_combines_with_the_character_lora(method, loras):
    character = generate(method, loras["a"])
    styled = generate(method, loras["a"], style_lora_path=str(loras["style"]), style_lora_id="style-1")
    assert max_diff(styled, character) > 5
    # a later job without a style LoRA does not keep the style active
    assert max_diff(generate(method, loras["a"]), character) == 0


def test_trigger_token_is_inserted_once():
    assert with_trigger("a photo at the beach", "ohwx") == "ohwx, a photo at the beach"
    assert with_trigger("portrait of OHWX man", "ohwx") == "portrait of OHWX man"
    assert with_trigger("a photo", "<alk-12>") == "<alk-12>, a photo"
    assert with_trigger("<alk-12> in the rain", "<alk-12>") == "<alk-12> in the rain"
    assert with_trigger("bohwxa", "ohwx") == "ohwx, bohwxa"  # inside another word: not the token
    assert with_trigger("", "ohwx") == "ohwx"
    assert with_trigger("a photo", "") == "a photo"


def test_trigger_token_reaches_the_pipeline(method, loras):
    explicit = generate(method, loras["a"], prompt="ohwx, a photo")
    assert generate(method, loras["a"], prompt="a photo", trigger_token="ohwx").tolist() == explicit.tolist()


def test_exact_size_steps_and_determinism(method, loras):
    steps = []
    first = generate(method, loras["a"], size=(63, 57), on_step=lambda step, total: steps.append((step, total)))
    assert first.shape == (57, 63, 3)
    assert steps == [(1, STEPS), (2, STEPS)]
    assert generate(method, loras["a"], size=(63, 57)).tolist() == first.tolist()


def test_flux_lora_end_to_end(models_dir, loras):
    method = LoraMethod(models_dir, LoadOptions(), target_rank=TARGET_RANK)
    steps = []
    request = GenerationRequest(
        references=[],
        prompt="a photo",
        width=48,
        height=40,
        steps=STEPS,
        seed=SEED,
        params={"base_model": "flux", "lora_path": str(loras["flux"]), "lora_id": "flux-1"},
    )
    with_lora = pixels(method.generate(request, lambda step, total: steps.append(step))[0])
    assert with_lora.shape == (40, 48, 3)
    assert steps == [1, 2]
    request.params["lora_scale"] = 0.0
    assert max_diff(pixels(method.generate(request)[0]), with_lora) > 5
    assert method.base_loads == 1
    assert method.adapters["flux"].denoiser is method.pipelines["flux"].transformer


def test_missing_base_weights_and_lora_files(tmp_path, loras):
    method = LoraMethod(tmp_path, LoadOptions(), target_rank=TARGET_RANK)
    with pytest.raises(ModelMissing, match="model_index.json"):
        method.pipeline_for("sdxl")
    with pytest.raises(GenerationFailed, match="does not exist"):
        method.generate(
            GenerationRequest(references=[], prompt="x", params={"base_model": "sdxl", "lora_path": "/nope.st"})
        )


# -- validation --------------------------------------------------------------------------------------------


def assert_invalid(data, base_model, models_dir, match: str) -> InvalidLora:
    with pytest.raises(InvalidLora, match=match) as caught:
        inspect_lora(data, base_model, models_dir)
    error = caught.value
    assert (error.code, error.status_code, error.field) == ("invalid_lora", 422, "file")
    return error


def test_inspect_reports_format_rank_and_targets(models_dir, loras):
    info = inspect_lora(loras["a"].read_bytes(), "sdxl", models_dir)
    assert (info.format, info.base_model, info.rank, info.components) == ("diffusers", "sdxl", 4, ("unet",))
    assert info.n_tensors == 2 * len(info.target_modules)
    assert all(name.endswith(("to_q", "to_k", "to_v", "to_out.0")) for name in info.target_modules)
    flux = inspect_lora(loras["flux"], "flux", models_dir)
    assert (flux.format, flux.rank, flux.components) == ("diffusers", 4, ("transformer",))


def test_non_safetensors_files_are_refused(models_dir):
    assert_invalid(pickle.dumps({"unet.x.lora_A.weight": [1.0]}), "sdxl", models_dir, "pickle")
    buffer = io.BytesIO()
    torch.save({"unet.x.lora_A.weight": torch.zeros(2)}, buffer)
    assert_invalid(buffer.getvalue(), "sdxl", models_dir, "zip")
    assert_invalid(np.random.default_rng(0).bytes(4096), "sdxl", models_dir, "not safetensors")
    assert_invalid(b"", "sdxl", models_dir, "not safetensors")


def test_truncated_file_is_refused(models_dir, loras):
    data = loras["a"].read_bytes()
    assert_invalid(data[: len(data) - 100], "sdxl", models_dir, "truncated")


def test_too_large_file_is_refused(models_dir, loras, settings):
    settings.ALKEMY_MAX_LORA_BYTES = 1000
    error = assert_invalid(loras["a"], "sdxl", models_dir, "limit is 1000 bytes")
    assert error.details["size_bytes"] == loras["a"].stat().st_size


def test_lora_for_another_base_model_is_refused(models_dir, loras):
    error = assert_invalid(loras["a"], "flux", models_dir, "made for SDXL, not FLUX")
    assert error.details["made_for"] == "sdxl"
    assert_invalid(loras["flux"], "sdxl", models_dir, "made for FLUX.1, not SDXL")
    assert_invalid(loras["a_kohya"], "flux", models_dir, "made for SDXL")


def test_keys_naming_missing_modules_are_refused(models_dir, loras, tmp_path):
    tensors = load_file(loras["a"])
    # every down block's modules moved to a block the tiny UNet does not have (its attention level's index
    # follows the tiny UNet's depth, so no index is spelled out here)
    renamed = {re.sub(r"down_blocks\.\d+\.", "down_blocks.7.", key): value for key, value in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, tmp_path / "bad.safetensors")
    error = assert_invalid(tmp_path / "bad.safetensors", "sdxl", models_dir, "no such module")
    assert error.details["problem_count"] > 1

    # the right module names with the wrong sizes (a LoRA for a bigger model of the same family)
    widened = {
        key: torch.zeros(value.shape[0], value.shape[1] * 2) if ".lora_A." in key else value
        for key, value in tensors.items()
    }
    save_file(widened, tmp_path / "wide.safetensors")
    assert_invalid(tmp_path / "wide.safetensors", "sdxl", models_dir, "do not fit")

    save_file({"vae.decoder.lora_A.weight": torch.zeros(2, 2)}, tmp_path / "odd.safetensors")
    assert_invalid(tmp_path / "odd.safetensors", "sdxl", models_dir, "Unrecognised LoRA key layout")
