"""Where PuLID-FLUX and InstantID follow the official code: each test pins one official behaviour.

The facts come from ToTheBeginning/PuLID (`app_flux.py`, `flux/sampling.py`, `pulid/pipeline_flux.py`)
and instantX-research/InstantID (`pipeline_stable_diffusion_xl_instantid*.py`, `gradio_demo/app.py`),
run on the tiny models of `build_test_models`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from characters.faces import get_embedder
from generation.methods.base import GenerationFailed, GenerationRequest, LoadOptions, ReferenceFace
from generation.methods.pulid_flux import DEMO_NEGATIVE_PROMPT, PulidFluxMethod, true_cfg_enabled
from generation.model_registry import component_path
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
