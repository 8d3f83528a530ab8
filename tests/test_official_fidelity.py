"""Where PuLID-FLUX and InstantID follow the official code: each test pins one official behaviour.

The facts come from ToTheBeginning/PuLID (`app_flux.py`, `flux/sampling.py`, `pulid/pipeline_flux.py`)
and instantX-research/InstantID (`pipeline_stable_diffusion_xl_instantid*.py`, `gradio_demo/app.py`),
run on the tiny models of `build_test_models`.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from characters.faces import get_embedder
from generation.instantid.attention import IPAttnProcessor
from generation.instantid.keypoints import draw_keypoints, face_region_mask, place_box, place_keypoints
from generation.instantid.weights import read_ip_adapter
from generation.methods.base import GenerationFailed, GenerationRequest, InvalidWeights, LoadOptions, ReferenceFace
from generation.methods.instantid_sdxl import InstantIdSdxlMethod, attention_region_masks, keypoint_reference
from generation.methods.pulid_flux import DEMO_NEGATIVE_PROMPT, PulidFluxMethod, true_cfg_enabled
from generation.model_registry import component_path
from generation.pulid.eva_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from generation.pulid.face import eva_input, limit_long_side
from generation.pulid.weights import load_bisenet, load_eva_clip
from generation.tiny.base_models import write_flux, write_sdxl
from generation.tiny.instantid import write_instantid_components
from generation.tiny.pulid import write_pulid_components
from tests import photos

PROMPT = "portrait photo of a person in a rainy street"


def reference_of(image: np.ndarray) -> ReferenceFace:
    embedder = get_embedder()
    face = embedder.analyze(image)[0]
    return ReferenceFace(image, face.box, face.keypoints, face.embedding, embedder.info.name)


@pytest.fixture(scope="module")
def astronaut() -> ReferenceFace:
    return reference_of(photos.astronaut())


@pytest.fixture(scope="module")
def tom_hanks() -> ReferenceFace:
    return reference_of(photos.tom_hanks())


# =========================================================================== PuLID-FLUX


@pytest.fixture(scope="module")
def pulid_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pulid-models")
    write_flux(component_path(directory, "flux"))
    write_pulid_components(directory, embedder_dims=get_embedder().info.dims)
    return directory


@pytest.fixture(scope="module")
def pulid(pulid_models) -> PulidFluxMethod:
    return PulidFluxMethod.load(pulid_models, LoadOptions())


def pulid_run(method, references, *, steps=2, negative_prompt="", guidance=None, **params) -> np.ndarray:
    request = GenerationRequest(
        references=references,
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        width=64,
        height=64,
        steps=steps,
        seed=3,
        guidance=guidance,
        params=params,
    )
    return np.asarray(method.generate(request)[0])


@pytest.fixture
def transformer_calls(pulid):
    """Every FLUX transformer call of a generation: its keyword arguments (guidance, text tokens)."""
    calls = []
    handle = pulid.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    yield calls
    handle.remove()


@pytest.fixture
def encoded_prompts(pulid, monkeypatch):
    """The (prompt, max_sequence_length) pairs the pipeline's text encoders were asked for."""
    prompts = []
    original = pulid.pipeline.encode_prompt

    def spy(*args, **kwargs):
        prompts.append((kwargs["prompt"], kwargs["max_sequence_length"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(pulid.pipeline, "encode_prompt", spy)
    return prompts


def test_pulid_true_cfg_is_on_when_the_scale_differs_from_one_by_more_than_a_hundredth():
    assert not true_cfg_enabled(1.0) and not true_cfg_enabled(1.009) and not true_cfg_enabled(0.995)
    assert true_cfg_enabled(1.02) and true_cfg_enabled(2.0)
    assert true_cfg_enabled(0.5)  # below 1 counts too (diffusers' FluxPipeline would ignore it)


def test_pulid_negative_pass_starts_at_step_one(pulid, astronaut, transformer_calls):
    pulid_run(pulid, [astronaut], steps=3, true_cfg=2.0)
    assert len(transformer_calls) == 1 + 2 + 2  # step 0 conditional only, then conditional + negative

    transformer_calls.clear()
    pulid_run(pulid, [astronaut], steps=3, true_cfg=2.0, timestep_to_start_cfg=0)
    assert len(transformer_calls) == 2 + 2 + 2  # our former behaviour, as an option

    transformer_calls.clear()
    pulid_run(pulid, [astronaut], steps=3, true_cfg=0.5)
    assert len(transformer_calls) == 5  # a scale below 1 is true CFG as well

    transformer_calls.clear()
    pulid_run(pulid, [astronaut], steps=3, true_cfg=1.005)
    assert len(transformer_calls) == 3


def test_pulid_one_step_with_true_cfg_is_the_plain_step(pulid, astronaut):
    # With a single step the negative pass never starts: the image is the one without true CFG.
    plain = pulid_run(pulid, [astronaut], steps=1)
    np.testing.assert_array_equal(pulid_run(pulid, [astronaut], steps=1, true_cfg=3.0), plain)
    assert not np.array_equal(pulid_run(pulid, [astronaut], steps=1, true_cfg=3.0, timestep_to_start_cfg=0), plain)


def test_pulid_true_cfg_uses_the_demo_negative_prompt_when_none_is_given(pulid, astronaut, encoded_prompts):
    pulid_run(pulid, [astronaut], true_cfg=2.0)
    assert encoded_prompts == [(PROMPT, 128), (DEMO_NEGATIVE_PROMPT, 128)]
    assert DEMO_NEGATIVE_PROMPT == "bad quality, worst quality, text, signature, watermark, extra limbs"

    encoded_prompts.clear()
    pulid_run(pulid, [astronaut], true_cfg=2.0, negative_prompt="blurry")
    assert [prompt for prompt, _ in encoded_prompts] == [PROMPT, "blurry"]

    encoded_prompts.clear()
    pulid_run(pulid, [astronaut], negative_prompt="blurry")  # no true CFG: no negative prompt is encoded
    assert [prompt for prompt, _ in encoded_prompts] == [PROMPT]


def test_pulid_defaults_guidance_4_and_128_t5_tokens(pulid, astronaut, transformer_calls):
    assert PulidFluxMethod.default_guidance == 4.0
    pulid_run(pulid, [astronaut], steps=1)
    (call,) = transformer_calls
    assert call["guidance"].tolist() == [4.0]
    assert call["encoder_hidden_states"].shape[1] == 128

    transformer_calls.clear()
    pulid_run(pulid, [astronaut], steps=1, guidance=2.5, max_sequence_length=256)
    (call,) = transformer_calls
    assert call["guidance"].tolist() == [2.5]
    assert call["encoder_hidden_states"].shape[1] == 256


@pytest.mark.parametrize(
    "params",
    [{"max_sequence_length": 513}, {"max_sequence_length": "128"}, {"timestep_to_start_cfg": -1}],
)
def test_pulid_sampler_params_are_validated(pulid, astronaut, params):
    with pytest.raises(GenerationFailed) as caught:
        pulid_run(pulid, [astronaut], **params)
    assert caught.value.code == "generation_failed" and next(iter(params)) in caught.value.message


def test_pulid_without_id_and_true_cfg_is_stock_flux_pipeline(pulid, pulid_models, astronaut):
    """Our written-out loop is FluxPipeline's (PuLID's sampler is the same Euler flow with the same schedule)."""
    from diffusers import FluxPipeline

    from generation.methods.base import generator_for

    stock = FluxPipeline.from_pretrained(component_path(pulid_models, "flux"))
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt=PROMPT,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=4.0,
        max_sequence_length=128,
        generator=generator_for(3, "cpu"),
    ).images[0]
    np.testing.assert_array_equal(pulid_run(pulid, [astronaut], steps=3, id_weight=0.0), np.asarray(expected))
    # From step 0 and above 1, PuLID's true CFG is FluxPipeline's.
    with_cfg = stock(
        prompt=PROMPT,
        negative_prompt="blurry",
        true_cfg_scale=2.0,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=4.0,
        max_sequence_length=128,
        generator=generator_for(3, "cpu"),
    ).images[0]
    ours = pulid_run(
        pulid, [astronaut], steps=3, id_weight=0.0, true_cfg=2.0, timestep_to_start_cfg=0, negative_prompt="blurry"
    )
    np.testing.assert_array_equal(ours, np.asarray(with_cfg))


# --------------------------------------------------------------------------- PuLID multi-reference


def test_pulid_one_reference_gives_its_own_id_tokens_in_every_mix(pulid, astronaut):
    # PuLID-FLUX takes one ID image; several references (mean / concat) are our documented extension.
    single = pulid.id_encoder.encode(astronaut)
    for mode in ("mean", "concat"):
        torch.testing.assert_close(pulid.id_encoder.encode_all([astronaut], mode), single)


# --------------------------------------------------------------------------- PuLID ID image pre-processing


def shrunk_as_pulid_does(image: np.ndarray, long_side: int = 1024) -> np.ndarray:
    """PuLID's demo: never enlarge; otherwise Lanczos to `long_side` on the long edge, sizes truncated to int."""
    height, width = image.shape[:2]
    if max(height, width) <= long_side:
        return image
    factor = long_side / max(height, width)
    return cv2.resize(image, (int(width * factor), int(height * factor)), interpolation=cv2.INTER_LANCZOS4)


def test_pulid_shrinks_a_large_id_photo_to_a_1024_px_long_side_with_lanczos(astronaut):
    big = cv2.resize(astronaut.image, (1791, 1791), interpolation=cv2.INTER_CUBIC)
    big = np.ascontiguousarray(np.pad(big, ((0, 0), (0, 709), (0, 0))))  # 2500 x 1791
    shrunk, _ = limit_long_side(big, astronaut.keypoints * 3.5)
    assert shrunk.shape == (733, 1024, 3)  # 1791 * 1024 / 2500 = 733.6, truncated
    np.testing.assert_array_equal(shrunk, shrunk_as_pulid_does(big))

    small = astronaut.image  # 512 px: used as it is, never enlarged
    same, keypoints = limit_long_side(small, astronaut.keypoints)
    assert same is small and np.allclose(keypoints, astronaut.keypoints)


def test_pulid_keypoints_follow_the_shrunk_photo():
    image = np.zeros((2000, 3000, 3), np.uint8)
    spots = np.array([[700.0, 500.0], [2300.0, 520.0], [1500.0, 1000.0], [900.0, 1500.0], [2100.0, 1480.0]])
    for x, y in spots:
        cv2.circle(image, (int(x), int(y)), 12, (255, 255, 255), -1)
    shrunk, moved = limit_long_side(image, spots)
    for (x, y), spot in zip(moved, spots, strict=True):
        window = shrunk[int(y) - 10 : int(y) + 11, int(x) - 10 : int(x) + 11, 0].astype(float)
        ys, xs = np.mgrid[int(y) - 10 : int(y) + 11, int(x) - 10 : int(x) + 11]
        centroid = np.array([(xs * window).sum(), (ys * window).sum()]) / window.sum()
        np.testing.assert_allclose(centroid, [x, y], atol=0.25, err_msg=str(spot))


def test_pulid_aligns_the_shrunk_photo(pulid, astronaut, monkeypatch):
    import generation.pulid.id_encoder as id_encoder

    seen = []
    original = id_encoder.align_face

    def spy(image, keypoints):
        seen.append(image.shape)
        return original(image, keypoints)

    monkeypatch.setattr(id_encoder, "align_face", spy)
    big = cv2.resize(astronaut.image, (2048, 2048), interpolation=cv2.INTER_CUBIC)
    reference = ReferenceFace(big, astronaut.box, astronaut.keypoints * 4, astronaut.embedding, astronaut.embedder)
    pulid.id_encoder.eva_features(reference)
    assert seen == [(1024, 1024, 3)]


def test_pulid_eva_input_is_bicubic_without_antialiasing():
    # torchvision 0.15.2 (PuLID's pin) resizes tensors without antialiasing.
    torch.manual_seed(0)
    face = (torch.rand(1, 3, 512, 512) > 0.5).float()  # high frequencies: antialiasing would show
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    plain = torch.nn.functional.interpolate(face, size=(336, 336), mode="bicubic", align_corners=False)
    torch.testing.assert_close(eva_input(face, 336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), (plain - mean) / std)
    smoothed = torch.nn.functional.interpolate(face, size=(336, 336), mode="bicubic", antialias=True)
    assert (plain - smoothed).abs().max() > 0.1


# --------------------------------------------------------------------------- released checkpoint layouts


def test_tiny_eva_file_has_the_released_full_clip_layout(pulid_models):
    state = torch.load(component_path(pulid_models, "eva_clip"), weights_only=True)
    assert {"logit_scale", "text.positional_embedding", "text.text_projection", "text.ln_final.weight"} <= set(state)
    assert {"text.transformer.resblocks.1.attn.in_proj_weight", "text.transformer.resblocks.1.mlp.c_fc.bias"} <= set(
        state
    )
    assert {"visual.rope.freqs_cos", "visual.blocks.0.attn.rope.freqs_sin"} <= set(state)
    assert len(load_eva_clip(component_path(pulid_models, "eva_clip")).blocks) == 6


@pytest.mark.parametrize(
    "key", ["text.transformer.resblocks.0.attn.extra", "text.adapter.weight", "visual_projection", "visual.extra"]
)
def test_eva_loader_refuses_keys_the_release_does_not_have(pulid_models, tmp_path, key):
    state = torch.load(component_path(pulid_models, "eva_clip"), weights_only=True)
    state[key] = torch.zeros(2)
    path = tmp_path / "EVA02_CLIP_L_336_psz14_s6B.pt"
    torch.save(state, path)
    with pytest.raises(InvalidWeights) as caught:
        load_eva_clip(path)
    assert key in caught.value.message and str(path) in caught.value.message


def test_eva_loader_accepts_the_eva_clip_wrappers(pulid_models, tmp_path):
    state = torch.load(component_path(pulid_models, "eva_clip"), weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert len(load_eva_clip(path).blocks) == 6


def test_checkpoints_are_read_without_running_pickled_code(pulid_models, tmp_path):
    import argparse

    path = tmp_path / "pickled.pt"
    torch.save({"visual.cls_token": torch.zeros(1), "config": argparse.Namespace(x=1)}, path)
    for loader in (load_eva_clip, load_bisenet, read_ip_adapter):
        with pytest.raises(InvalidWeights, match="not a readable torch checkpoint"):
            loader(path)


@pytest.mark.parametrize("change", ["add", "remove"])
def test_bisenet_loads_strictly(pulid_models, tmp_path, change):
    state = torch.load(component_path(pulid_models, "face_parsing"), weights_only=True)
    key = "ffm.conv_extra.weight" if change == "add" else "conv_out16.conv_out.weight"
    if change == "add":
        state[key] = torch.zeros(1)
    else:
        del state[key]
    path = tmp_path / "parsing_bisenet.pth"
    torch.save(state, path)
    with pytest.raises(InvalidWeights) as caught:
        load_bisenet(path)
    assert key in caught.value.message and str(path) in caught.value.message


# =========================================================================== InstantID


@pytest.fixture(scope="module")
def instantid_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("instantid-models")
    write_sdxl(component_path(directory, "sdxl"))
    write_instantid_components(directory, embedder_dims=get_embedder().info.dims)
    return directory


@pytest.fixture(scope="module")
def instantid(instantid_models) -> InstantIdSdxlMethod:
    return InstantIdSdxlMethod.load(instantid_models, LoadOptions())


def instantid_run(method, references, *, size: int = 64, **params) -> np.ndarray:
    request = GenerationRequest(
        references=references, prompt="a portrait photo", width=size, height=size, steps=2, seed=7, params=params
    )
    return np.asarray(method.generate(request)[0]).astype(int)


@pytest.fixture
def unet_calls(instantid):
    """Every UNet call of a generation: its keyword arguments (tokens, ControlNet residuals)."""
    calls = []
    handle = instantid.pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    yield calls
    handle.remove()


# --------------------------------------------------------------------------- keypoint image


def stroke_sizes(width: int, height: int, **options) -> tuple[int, int]:
    """(dot diameter, limb thickness) in pixels of draw_keypoints on a width x height canvas."""
    cx, cy = width // 2, height // 2
    keypoints = np.array([[cx - 200, cy], [cx + 150, cy - 150], [cx, cy], [cx - 150, cy + 150], [cx + 200, cy + 200]])
    image = np.asarray(draw_keypoints(keypoints, width, height, **options))
    dot = int((image[cy + 200] == (255, 0, 255)).all(axis=-1).sum())  # row through the right mouth corner
    limb = int((image[:, cx - 100] == (153, 0, 0)).all(axis=-1).sum())  # across the horizontal left-eye limb
    return dot, limb


@pytest.mark.parametrize("size", [(768, 768), (960, 1280), (1024, 1024), (1280, 1280)])
def test_keypoint_image_uses_draw_kps_fixed_sizes_at_any_canvas(size):
    # draw_kps: limb ellipses of half-width 4 (9 px across), dots of radius 10 (21 px), limbs at 60 % colour.
    assert stroke_sizes(*size) == (21, 9)


def test_keypoint_image_scaled_with_the_canvas_is_an_option():
    assert stroke_sizes(1280, 1280, scale_with_canvas=True) == (25, 11)
    assert stroke_sizes(768, 768, scale_with_canvas=True) == (17, 7)


def test_keypoint_drawing_param_picks_the_drawing(instantid, astronaut):
    fixed = instantid_run(instantid, [astronaut])
    np.testing.assert_array_equal(instantid_run(instantid, [astronaut], keypoint_drawing="fixed"), fixed)
    assert not np.array_equal(instantid_run(instantid, [astronaut], keypoint_drawing="scaled"), fixed)
    with pytest.raises(GenerationFailed, match="keypoint_drawing"):
        instantid_run(instantid, [astronaut], keypoint_drawing="large")


# --------------------------------------------------------------------------- negative prompt


def test_instantid_encodes_the_empty_negative_prompt(instantid, astronaut, unet_calls):
    pipe = instantid.pipeline
    empty, _, _, _ = pipe.encode_prompt(prompt="", device="cpu", do_classifier_free_guidance=False)
    instantid_run(instantid, [astronaut])
    negative_text = unet_calls[0]["encoder_hidden_states"][:1, :-16]  # [negative, positive] x (text + 16 ID tokens)
    torch.testing.assert_close(negative_text, empty)
    assert negative_text.abs().sum() > 0

    unet_calls.clear()
    instantid_run(instantid, [astronaut], zero_empty_negative_prompt=True)  # our former behaviour, as an option
    assert unet_calls[0]["encoder_hidden_states"][:1, :-16].abs().sum() == 0


# --------------------------------------------------------------------------- several references


def test_instantid_uses_the_largest_face_by_default(instantid, astronaut, tom_hanks):
    # InstantID takes the largest face of one photo; the astronaut's face is larger than Tom Hanks'.
    largest = instantid_run(instantid, [astronaut])
    np.testing.assert_array_equal(instantid_run(instantid, [tom_hanks, astronaut]), largest)
    np.testing.assert_array_equal(instantid_run(instantid, [tom_hanks, astronaut], id_mix="largest_face"), largest)
    assert not np.array_equal(instantid_run(instantid, [tom_hanks, astronaut], id_mix="mean"), largest)
    with pytest.raises(GenerationFailed, match="id_mix"):
        instantid_run(instantid, [astronaut], id_mix="concat")


def test_the_largest_face_is_the_largest_box_area():
    def face(box):
        return ReferenceFace(np.zeros((8, 8, 3), np.uint8), box, np.zeros((5, 2)), np.ones(4), "dlib")

    tall = face((0, 0, 100, 300))  # area 30000, shorter side 100
    square = face((0, 0, 150, 150))  # area 22500, shorter side 150
    assert keypoint_reference([square, tall]) is tall
    twin = face((10, 10, 110, 310))
    assert keypoint_reference([tall, twin]) is tall  # the first on a tie


# --------------------------------------------------------------------------- enhance non-face region


def test_enhance_non_face_region_is_opt_in_and_validated(instantid, astronaut):
    plain = instantid_run(instantid, [astronaut])
    np.testing.assert_array_equal(instantid_run(instantid, [astronaut], enhance_non_face_region=False), plain)
    assert not np.array_equal(instantid_run(instantid, [astronaut], enhance_non_face_region=True), plain)
    for value in ("yes", 1, None):
        with pytest.raises(GenerationFailed, match="enhance_non_face_region"):
            instantid_run(instantid, [astronaut], enhance_non_face_region=value)


def test_enhance_non_face_region_keeps_identitynet_inside_the_face_box(instantid, astronaut, unet_calls):
    # 96 px: the smallest frame whose coarsest residual grid (96 / 8 / 2 = 6) has a cell wholly inside the face box
    instantid_run(instantid, [astronaut], size=96, enhance_non_face_region=True)
    face_box = place_box(astronaut.box, astronaut.keypoints, place_keypoints(astronaut.keypoints, (512, 512), 96, 96))
    region = torch.from_numpy(face_region_mask(face_box, 96, 96))[None, None]
    assert 0 < region.mean() < 1
    call = unet_calls[0]
    for residual in (*call["down_block_additional_residuals"], call["mid_block_additional_residual"]):
        weight = torch.nn.functional.interpolate(region, size=residual.shape[-2:], mode="bilinear")
        outside, inside = (weight == 0).expand_as(residual), (weight == 1).expand_as(residual)
        assert outside.any() and bool((residual[outside] == 0).all())
        assert residual[inside].abs().sum() > 0
    # The ID attention masks are only set for the generation that asked for them.
    processors = [p for p in instantid.pipeline.unet.attn_processors.values() if isinstance(p, IPAttnProcessor)]
    assert processors and not any(p.region_masks for p in processors)


def test_a_face_outside_the_frame_with_enhance_non_face_region_leaves_plain_sdxl(instantid, astronaut):
    # The mask is zero everywhere: neither IdentityNet nor the ID attention may change any pixel.
    off_frame = (astronaut.keypoints - 1000).tolist()
    plain = instantid_run(instantid, [astronaut], ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0)
    masked = instantid_run(instantid, [astronaut], pose_keypoints=off_frame, enhance_non_face_region=True)
    np.testing.assert_array_equal(masked, plain)


def test_attention_region_masks_cover_every_unet_resolution(instantid):
    region = torch.zeros(1, 1, 40, 24)
    region[..., 8:24, 4:16] = 1
    masks = attention_region_masks(region, (10, 6), instantid.pipeline.unet)
    levels = len(instantid.pipeline.unet.config.block_out_channels)
    expected_grids = [(10, 6), (5, 3), (3, 2), (2, 1)][:levels]
    assert sorted(masks, reverse=True) == [h * w for h, w in expected_grids]
    assert masks[60].shape == (1, 60, 1) and set(masks[60].unique().tolist()) == {0.0, 1.0}
