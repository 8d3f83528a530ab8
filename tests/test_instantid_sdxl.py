"""InstantID on tiny SDXL weights (CPU): generation, equivalence with plain SDXL, strict loading, building blocks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from generation.instantid import (
    INSTANTID_RESAMPLER,
    IPAttnProcessor,
    Resampler,
    draw_keypoints,
    ip_adapter_keys,
    place_keypoints,
)
from generation.instantid.keypoints import KEYPOINT_COLORS
from generation.methods.base import GenerationRequest, InvalidWeights, LoadOptions, ModelMissing, ReferenceFace
from generation.methods.instantid_sdxl import InstantIdSdxlMethod, id_embedding, keypoint_reference
from generation.model_registry import component_path
from generation.tiny.base_models import write_sdxl
from generation.tiny.instantid import write_instantid_components

STEPS = 2
ADAPTER = "instantid/ip-adapter.bin"


def reference_of(pixels: np.ndarray) -> ReferenceFace:
    from characters.faces import get_embedder

    embedder = get_embedder()
    face = embedder.analyze(pixels)[0]
    return ReferenceFace(pixels, face.box, face.keypoints, face.embedding, embedder.info.name)


def embedder_dims() -> int:
    from characters.faces import get_embedder

    return get_embedder().info.dims


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    write_sdxl(directory / "stable-diffusion-xl-base-1.0")
    write_instantid_components(directory, embedder_dims=embedder_dims())
    return directory


@pytest.fixture(scope="module")
def method(models_dir) -> InstantIdSdxlMethod:
    return InstantIdSdxlMethod.load(models_dir, LoadOptions())


@pytest.fixture(scope="module")
def astronaut_face() -> ReferenceFace:
    from tests.photos import astronaut

    return reference_of(astronaut())


def request_for(face: ReferenceFace, **overrides) -> GenerationRequest:
    values = dict(references=[face], prompt="a portrait photo", width=64, height=64, steps=STEPS, seed=7)
    values.update(overrides)
    return GenerationRequest(**values)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def models_copy(models_dir, tmp_path):
    """A private copy of the tiny models to damage."""
    target = tmp_path / "models"
    shutil.copytree(models_dir, target)
    return target


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (64, 96), (60, 44)])
def test_generates_images_of_the_requested_size_and_reports_every_step(method, astronaut_face, size):
    steps = []
    images = method.generate(
        request_for(astronaut_face, width=size[0], height=size[1], num_images=2 if size == (64, 64) else 1),
        lambda step, total: steps.append((step, total)),
    )
    assert len(images) == (2 if size == (64, 64) else 1)
    assert all(image.size == size and image.mode == "RGB" for image in images)
    assert steps == [(1, STEPS), (2, STEPS)]


def test_renders_the_production_default_size_with_production_latent_and_control_sizes(method, astronaut_face):
    # The tiny models keep SDXL's geometry: 1024² is 128² latents, and IdentityNet takes the 1024² keypoint
    # image and brings it down 8x onto that latent grid.
    seen = []
    hook = method.pipeline.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape, kwargs["controlnet_cond"].shape)), with_kwargs=True
    )
    try:
        request = GenerationRequest(references=[astronaut_face], prompt="a portrait photo", steps=STEPS)
        images = method.generate(request)
    finally:
        hook.remove()
    assert (request.width, request.height) == (1024, 1024)
    assert [image.size for image in images] == [(1024, 1024)]
    # CFG batch of 2: latents (2, 4, 128, 128), control image (2, 3, 1024, 1024)
    assert seen == [((2, 4, 128, 128), (2, 3, 1024, 1024))] * STEPS


def test_identitynet_encodes_the_control_image_once_per_generation_with_the_same_result(
    method, astronaut_face, monkeypatch
):
    """The condition encoder's features are computed at the first step and reused: same pixels as
    recomputing them at every step (diffusers' ControlNet), one encoder call instead of `steps`."""
    from generation.methods import instantid_sdxl

    encoder = method.pipeline.controlnet.controlnet_cond_embedding
    calls = []
    hook = encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    try:
        request = request_for(astronaut_face, steps=3, seed=11)
        once = method.generate(request)[0]
        assert len(calls) == 1
        monkeypatch.setattr(instantid_sdxl._EncodedOnce, "forward", lambda self, image: self.encoder(image))
        every_step = method.generate(request)[0]
        assert len(calls) == 1 + 3
    finally:
        hook.remove()
    assert np.array_equal(pixels(once), pixels(every_step))
    assert method.pipeline.controlnet.controlnet_cond_embedding is encoder  # put back after the loop


def test_same_seed_same_image_other_seed_other_image(method, astronaut_face):
    first = method.generate(request_for(astronaut_face, seed=3))[0]
    again = method.generate(request_for(astronaut_face, seed=3))[0]
    other = method.generate(request_for(astronaut_face, seed=4))[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_zero_scales_give_plain_sdxl_and_each_branch_changes_the_image(method, models_dir, astronaut_face):
    from diffusers import StableDiffusionXLPipeline

    from generation.methods.base import generator_for

    stock = StableDiffusionXLPipeline.from_pretrained(component_path(models_dir, "sdxl"), add_watermarker=False).to(
        "cpu"
    )
    stock.set_progress_bar_config(disable=True)
    plain = stock(
        "a portrait photo",
        negative_prompt="",  # InstantID encodes the empty negative prompt
        width=64,
        height=64,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=generator_for(7, "cpu"),
    ).images[0]

    def ours(ip: float, control: float):
        params = {"ip_adapter_scale": ip, "controlnet_conditioning_scale": control}
        return pixels(method.generate(request_for(astronaut_face, guidance=5.0, params=params))[0])

    off = ours(0.0, 0.0)
    assert np.array_equal(off, pixels(plain))
    for ip, control in [(0.8, 0.0), (0.0, 0.8), (0.8, 0.8)]:
        assert np.abs(ours(ip, control) - off).max() > 1, (ip, control)


def test_several_references_average_their_embeddings_with_id_mix_mean(method, astronaut_face):
    from tests.photos import tom_hanks

    hanks = reference_of(tom_hanks())
    dims = embedder_dims()
    assert np.allclose(id_embedding([astronaut_face, astronaut_face], dims), id_embedding([astronaut_face], dims))
    mixed = id_embedding([astronaut_face, hanks], dims)
    expected = astronaut_face.embedding + hanks.embedding
    assert np.allclose(mixed / np.linalg.norm(mixed), expected / np.linalg.norm(expected), atol=1e-5)
    assert np.linalg.norm(mixed) == pytest.approx(dims**0.5)
    # the pose comes from the larger face (the astronaut's photo is 512 px, Tom Hanks' 112 px)
    assert keypoint_reference([hanks, astronaut_face]) is astronaut_face
    request = request_for(hanks, references=[hanks, astronaut_face], params={"id_mix": "mean"})
    assert method.generate(request)[0].size == (64, 64)


# --- loading ---------------------------------------------------------------------------------------


def damage_adapter(models, change) -> None:
    path = models / ADAPTER
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


@pytest.mark.parametrize(
    "section, key, change",
    [
        ("ip_adapter", "3.to_v_ip.weight", lambda d: d["ip_adapter"].pop("3.to_v_ip.weight")),
        ("ip_adapter", "99.to_k_ip.weight", lambda d: d["ip_adapter"].update({"99.to_k_ip.weight": torch.zeros(1)})),
        ("image_proj", "layers.1.0.to_kv.weight", lambda d: d["image_proj"].pop("layers.1.0.to_kv.weight")),
        ("image_proj", "latents", lambda d: d["image_proj"].pop("latents")),
        ("image_proj", "extra.bias", lambda d: d["image_proj"].update({"extra.bias": torch.zeros(1)})),
    ],
)
def test_adapter_loads_strictly(models_copy, section, key, change):
    damage_adapter(models_copy, change)
    with pytest.raises(InvalidWeights) as caught:
        InstantIdSdxlMethod.load(models_copy, LoadOptions())
    assert key in caught.value.message and section in caught.value.message
    assert str(models_copy / ADAPTER) in caught.value.message
    assert caught.value.code == "invalid_weights"


def test_adapter_for_another_embedder_is_refused(models_copy):
    write_instantid_components(models_copy, embedder_dims=embedder_dims() + 1)
    with pytest.raises(InvalidWeights, match="face embedder"):
        InstantIdSdxlMethod.load(models_copy, LoadOptions())


@pytest.mark.parametrize("remove", ["", ADAPTER, "instantid/ControlNetModel/diffusion_pytorch_model.safetensors"])
def test_missing_weights_name_the_file(models_copy, tmp_path, remove):
    models = models_copy if remove else tmp_path / "empty"
    if remove:
        (models / remove).unlink()
    with pytest.raises(ModelMissing) as caught:
        InstantIdSdxlMethod.load(models, LoadOptions())
    assert caught.value.code == "model_missing"
    assert str(models / (remove or "stable-diffusion-xl-base-1.0")) in caught.value.message


# --- building blocks -------------------------------------------------------------------------------


def test_control_image_has_the_frame_size_and_colours_at_the_keypoints():
    keypoints = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], dtype=float)
    image = np.asarray(draw_keypoints(keypoints, 100, 120))
    assert image.shape == (120, 100, 3)
    for (x, y), color in zip(keypoints.astype(int), KEYPOINT_COLORS, strict=True):
        assert tuple(image[y, x]) == color
    assert image[5, 5].sum() == 0  # black background
    assert image.reshape(-1, 3).any(axis=1).mean() < 0.2


def test_keypoints_are_placed_inside_the_output_frame(astronaut_face):
    height, width = astronaut_face.image.shape[:2]
    # same aspect: a plain rescale
    same = place_keypoints(astronaut_face.keypoints, (width, height), width // 2, height // 2)
    assert np.allclose(same, astronaut_face.keypoints / 2)
    # a very wide frame from a square photo: the crop follows the face
    for frame in [(64, 16), (16, 64), (1024, 640)]:
        placed = place_keypoints(astronaut_face.keypoints, (width, height), *frame)
        assert (placed >= 0).all() and (placed[:, 0] < frame[0]).all() and (placed[:, 1] < frame[1]).all()


def test_ip_processors_sit_on_every_cross_attention_layer(method):
    unet = method.pipeline.unet
    processors = unet.attn_processors
    cross = [name for name in processors if name.endswith("attn2.processor")]
    assert cross and all(isinstance(processors[name], IPAttnProcessor) for name in cross)
    assert not any(isinstance(p, IPAttnProcessor) for name, p in processors.items() if name not in cross)
    assert all(p.num_tokens == 16 for name, p in processors.items() if name in cross)
    # IdentityNet keeps plain attention: it is fed the ID tokens only
    assert not any(isinstance(p, IPAttnProcessor) for p in method.pipeline.controlnet.attn_processors.values())


def test_weight_key_numbering_of_the_real_sdxl_unet():
    """ip-adapter.bin numbers processors in unet.attn_processors order: SDXL's 70 cross-attentions are 1, 3, .., 139."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    expected = [f"{i}.to_{kv}_ip.weight" for i in range(1, 140, 2) for kv in "kv"]
    assert ip_adapter_keys(unet) == expected


def test_resampler_output_shape():
    tiny = Resampler(dim=64, depth=2, dim_head=64, heads=2, num_queries=16, embedding_dim=128, output_dim=64)
    assert tiny(torch.randn(3, 1, 128)).shape == (3, 16, 64)
    with torch.device("meta"):
        real = Resampler(**INSTANTID_RESAMPLER)
        assert real(torch.empty(2, 1, 512)).shape == (2, 16, 2048)
    assert {"latents", "proj_in.weight", "layers.3.0.to_kv.weight", "layers.3.1.3.weight", "norm_out.bias"} <= set(
        real.state_dict()
    )


def test_loads_and_runs_in_bfloat16(models_dir, astronaut_face):
    """The GPU dtype path on CPU: the ID processors and the Resampler follow the UNet's dtype."""
    method = InstantIdSdxlMethod.load(models_dir, LoadOptions(dtype=torch.bfloat16, vae_tiling=True))
    processors = [p for p in method.pipeline.unet.attn_processors.values() if isinstance(p, IPAttnProcessor)]
    assert {p.to_k_ip.weight.dtype for p in processors} == {torch.bfloat16}
    assert next(method.resampler.parameters()).dtype == torch.bfloat16
    assert method.generate(request_for(astronaut_face, steps=1))[0].size == (64, 64)
