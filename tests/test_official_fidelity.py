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
from generation.instantid.weights import read_ip_adapter
from generation.methods.base import GenerationFailed, GenerationRequest, InvalidWeights, LoadOptions, ReferenceFace
from generation.methods.pulid_flux import DEMO_NEGATIVE_PROMPT, PulidFluxMethod, true_cfg_enabled
from generation.model_registry import component_path
from generation.pulid.eva_clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from generation.pulid.face import eva_input, limit_long_side
from generation.pulid.weights import load_bisenet, load_eva_clip
from generation.tiny.base_models import write_flux
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
