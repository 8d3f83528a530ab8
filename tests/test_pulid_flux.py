"""PuLID-FLUX on tiny random weights: end to end, strict loading, and the pieces that decide correctness."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from characters.faces import get_embedder
from generation.methods.base import (
    GenerationRequest,
    InvalidWeights,
    LoadOptions,
    ModelMissing,
    ReferenceFace,
    generator_for,
)
from generation.methods.pulid_flux import PulidFluxMethod
from generation.model_registry import component_path
from generation.pulid.encoders import IDFormer, PerceiverAttentionCA
from generation.pulid.eva_clip import EvaVisionTransformer
from generation.pulid.face import FACE_TEMPLATE_512, align_face, alignment_matrix, face_features_image
from generation.pulid.flux_hooks import IdInjection, attach_pulid, num_ca_modules
from generation.pulid.id_encoder import combine_id_tokens
from generation.pulid.weights import ca_config, eva_config, idformer_config
from generation.tiny.base_models import write_flux
from generation.tiny.pulid import write_pulid_components
from tests import photos

PROMPT = "portrait photo of a person in a rainy street"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pulid-models")
    write_flux(component_path(directory, "flux"))
    write_pulid_components(directory, embedder_dims=get_embedder().info.dims)
    return directory


@pytest.fixture(scope="module")
def method(models_dir) -> PulidFluxMethod:
    return PulidFluxMethod.load(models_dir, LoadOptions())


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


def run(method, references, *, seed=1, width=64, height=64, steps=2, on_step=None, **params) -> list[np.ndarray]:
    request = GenerationRequest(
        references=references, prompt=PROMPT, width=width, height=height, steps=steps, seed=seed, params=params
    )
    return [np.asarray(image) for image in method.generate(request, on_step)]


# --------------------------------------------------------------------------- end to end


def test_generates_requested_sizes_deterministically_with_progress(method, astronaut):
    calls = []
    first = run(method, [astronaut], seed=1, on_step=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 2), (2, 2)]
    assert first[0].shape == (64, 64, 3) and first[0].std() > 0
    np.testing.assert_array_equal(run(method, [astronaut], seed=1)[0], first[0])
    assert not np.array_equal(run(method, [astronaut], seed=2)[0], first[0])

    request = GenerationRequest(references=[astronaut], prompt=PROMPT, width=48, height=80, steps=2, num_images=2)
    images = method.generate(request)
    assert [image.size for image in images] == [(48, 80), (48, 80)]
    # A size FLUX cannot pack (not a multiple of 8x VAE x 2x2 packing = 16) is generated larger and centre-cropped.
    assert run(method, [astronaut], width=50, height=42)[0].shape == (42, 50, 3)


def test_renders_the_production_default_size_with_production_token_counts(method, astronaut):
    # The tiny models keep FLUX.1-dev's geometry: 1024² is 128² latents, packed into 64 x 64 = 4096 tokens.
    seen = []
    hook = method.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape, kwargs["img_ids"].shape)),
        with_kwargs=True,
    )
    try:
        request = GenerationRequest(references=[astronaut], prompt=PROMPT, steps=2)
        images = method.generate(request)
    finally:
        hook.remove()
    assert (request.width, request.height) == (1024, 1024)
    assert [image.size for image in images] == [(1024, 1024)]
    assert seen == [((1, 4096, 64), (4096, 3))] * 2


def test_id_weight_zero_is_plain_flux_and_the_id_changes_the_image(method, models_dir, astronaut):
    from diffusers import FluxPipeline

    stock = FluxPipeline.from_pretrained(component_path(models_dir, "flux"))
    stock.set_progress_bar_config(disable=True)
    plain = stock(
        prompt=PROMPT,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=PulidFluxMethod.default_guidance,
        max_sequence_length=128,  # PuLID's prompt length
        generator=generator_for(5, "cpu"),
    ).images[0]
    plain = np.asarray(plain)
    np.testing.assert_array_equal(run(method, [astronaut], seed=5, id_weight=0.0)[0], plain)
    # Injection starting after the last step is no injection either.
    np.testing.assert_array_equal(run(method, [astronaut], seed=5, start_step=2)[0], plain)

    with_id = run(method, [astronaut], seed=5, id_weight=1.0)[0]
    assert np.abs(with_id.astype(int) - plain.astype(int)).max() > 0
    # A later start injects on fewer steps: a third, different result.
    assert not np.array_equal(run(method, [astronaut], seed=5, start_step=1)[0], with_id)


def test_true_cfg_gives_the_negative_pass_the_unconditional_id(method, astronaut, monkeypatch):
    passes = []
    original = IdInjection.current

    def spy(self):
        passes.append(self.pass_index)
        return original(self)

    monkeypatch.setattr(IdInjection, "current", spy)
    calls = []
    images = run(method, [astronaut], true_cfg=2.0, on_step=lambda step, total: calls.append(step))
    assert calls == [1, 2]
    # x 2 cross-attentions of the tiny transformer: step 0 conditional only (PuLID's
    # timestep_to_start_cfg=1), step 1 conditional then negative.
    assert passes == [0, 0, 0, 0, 1, 1]
    assert not np.array_equal(images[0], run(method, [astronaut])[0])
    passes.clear()
    run(method, [astronaut], true_cfg=2.0, timestep_to_start_cfg=0)
    assert passes == [0, 0, 1, 1, 0, 0, 1, 1]
    uncond = method.id_encoder.unconditional()
    assert uncond.shape == method.id_encoder.encode(astronaut).shape


def test_several_references_combine_by_mean_or_concat(method, astronaut, tom_hanks):
    a, b = method.id_encoder.encode(astronaut), method.id_encoder.encode(tom_hanks)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(method.id_encoder.encode_all([astronaut, tom_hanks], "mean"), (a + b) / 2)
    torch.testing.assert_close(combine_id_tokens([a], "mean"), a)
    concat = combine_id_tokens([a, b], "concat")
    assert concat.shape == (1, 2 * a.shape[1], a.shape[2])
    torch.testing.assert_close(concat[:, a.shape[1] :], b)

    mean_image = run(method, [astronaut, tom_hanks])[0]
    concat_image = run(method, [astronaut, tom_hanks], id_mix="concat")[0]
    assert mean_image.shape == concat_image.shape == (64, 64, 3)
    assert not np.array_equal(mean_image, concat_image)


def test_an_embedding_of_the_wrong_size_is_an_embedder_mismatch(method, astronaut):
    arcface_like = ReferenceFace(astronaut.image, astronaut.box, astronaut.keypoints, np.ones(512) / 512**0.5, "x")
    with pytest.raises(InvalidWeights, match="embedder"):
        method.id_encoder.encode(arcface_like)


# --------------------------------------------------------------------------- loading


@pytest.fixture
def copied_models(models_dir, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(models_dir, target)
    return target


def test_missing_pulid_weights_raise_model_missing(copied_models):
    component_path(copied_models, "pulid_flux_weights").unlink()
    with pytest.raises(ModelMissing) as caught:
        PulidFluxMethod.load(copied_models, LoadOptions())
    assert caught.value.code == "model_missing"
    assert "pulid_flux_v0.9.1.safetensors" in caught.value.message


@pytest.mark.parametrize("change", ["remove", "add"])
def test_pulid_safetensors_load_strictly(copied_models, change):
    path = component_path(copied_models, "pulid_flux_weights")
    state = load_file(path)
    key = "pulid_ca.1.to_kv.weight" if change == "remove" else "pulid_encoder.layers.0.0.extra"
    if change == "remove":
        del state[key]
    else:
        state[key] = torch.zeros(2)
    save_file(state, path)
    with pytest.raises(InvalidWeights) as caught:
        PulidFluxMethod.load(copied_models, LoadOptions())
    assert key in caught.value.message and str(path) in caught.value.message
    assert caught.value.code == "invalid_weights"


@pytest.mark.parametrize("change", ["remove", "add"])
def test_eva_checkpoint_loads_strictly(copied_models, change):
    path = component_path(copied_models, "eva_clip")
    state = torch.load(path, weights_only=True)
    key = "visual.blocks.2.attn.q_bias" if change == "remove" else "visual.blocks.0.attn.extra_bias"
    if change == "remove":
        del state[key]
    else:
        state[key] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(InvalidWeights) as caught:
        PulidFluxMethod.load(copied_models, LoadOptions())
    assert key in caught.value.message and str(path) in caught.value.message


def test_loaders_infer_the_real_architectures_from_shapes():
    # The defaults are the released models; shape inference must give them back.
    with torch.device("meta"):
        idformer, ca, eva = IDFormer(), PerceiverAttentionCA(), EvaVisionTransformer()
    assert idformer_config(idformer.state_dict(), "f") == dict(
        dim=1024, depth=10, dim_head=64, heads=16, num_id_token=5, num_queries=32, output_dim=2048,
        ff_mult=4.0, vit_dim=1024, mapping_dim=1024, id_input_dim=1280,
    )  # fmt: skip
    ca_state = {f"0.{k}": v for k, v in ca.state_dict().items()}
    assert ca_config(ca_state, "f") == dict(dim=3072, dim_head=128, heads=16, kv_dim=2048)
    assert eva_config(eva.state_dict(), "f") == dict(
        image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=2730, embed_dim=768
    )
    assert eva.hidden_state_layers == (4, 8, 12, 16, 20)
    assert num_ca_modules(19, 38) == 20 and num_ca_modules(2, 4) == 2


# --------------------------------------------------------------------------- pieces


def test_alignment_puts_the_eyes_on_the_template():
    # A photo whose keypoints are a rotated, scaled, shifted template: the warp must undo it exactly.
    angle, scale, shift = np.deg2rad(25), 0.45, np.array([60.0, 40.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    keypoints = FACE_TEMPLATE_512 @ rotation.T + shift
    image = np.zeros((360, 400, 3), np.uint8)
    cv2.circle(image, tuple(int(round(v)) for v in keypoints[0]), 4, (255, 0, 0), -1)  # left eye red
    cv2.circle(image, tuple(int(round(v)) for v in keypoints[1]), 4, (0, 0, 255), -1)  # right eye blue

    matrix = alignment_matrix(keypoints)
    mapped = np.c_[keypoints, np.ones(5)] @ matrix.T
    np.testing.assert_allclose(mapped, FACE_TEMPLATE_512, atol=0.5)
    aligned = align_face(image, keypoints)
    assert aligned.shape == (512, 512, 3)
    for channel, eye in ((0, FACE_TEMPLATE_512[0]), (2, FACE_TEMPLATE_512[1])):
        ys, xs = np.nonzero((aligned[..., channel] > 200) & (aligned[..., 1] < 50))  # the dot, not the grey border
        np.testing.assert_allclose([xs.mean(), ys.mean()], eye, atol=2.0)


def test_alignment_of_a_real_photo_and_the_parsed_grey_face(method, astronaut):
    matrix = alignment_matrix(astronaut.keypoints)
    eyes = np.c_[astronaut.keypoints[:2], np.ones(2)] @ matrix.T
    np.testing.assert_allclose(eyes, FACE_TEMPLATE_512[:2], atol=12)  # detector keypoints are not a similarity

    face = face_features_image(align_face(astronaut.image, astronaut.keypoints), method.id_encoder.parser)
    assert face.shape == (1, 3, 512, 512)
    white = (face == 1).all(dim=1)
    grey = (face[:, 0] == face[:, 1]) & (face[:, 1] == face[:, 2])
    assert bool((white | grey).all())  # background white, the rest grey: no colour reaches EVA-CLIP


def test_hooks_fire_right_after_every_2nd_double_and_4th_single_block():
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=5, num_single_layers=9, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    count = num_ca_modules(5, 9)
    assert count == 3 + 3
    events = []
    for kind, blocks in (("double", transformer.transformer_blocks), ("single", transformer.single_transformer_blocks)):
        for index, block in enumerate(blocks):  # registered first, so they run before the PuLID hooks
            block.register_forward_hook(lambda *_, name=f"{kind}{index}": events.append(name))
    ca_modules = torch.nn.ModuleList(PerceiverAttentionCA(dim=16, dim_head=8, heads=2, kv_dim=8) for _ in range(count))
    for index, ca in enumerate(ca_modules):
        ca.register_forward_hook(lambda *_, name=f"ca{index}": events.append(name))
    injection = IdInjection()
    attach_pulid(transformer, ca_modules, injection)
    assert transformer.pulid_ca is ca_modules and "pulid_ca.0.to_q.weight" in transformer.state_dict()

    injection.reset([torch.randn(1, 3, 8)], weight=1.0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 4), encoder_hidden_states=torch.randn(1, 3, 16),
        pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 3),
        txt_ids=torch.zeros(3, 3), return_dict=False,
    )  # fmt: skip
    with torch.no_grad():
        with_id = transformer(**inputs)[0]
    expected = (
        "double0 ca0 double1 double2 ca1 double3 double4 ca2 "
        "single0 ca3 single1 single2 single3 single4 ca4 single5 single6 single7 single8 ca5"
    )
    assert " ".join(events) == expected

    events.clear()
    injection.reset()  # nothing to inject: the hooks leave the blocks' outputs alone
    with torch.no_grad():
        without = transformer(**inputs)[0]
    assert not any(name.startswith("ca") for name in events)
    assert not torch.allclose(with_id, without)
