"""Model registry, tiny models, identity scores and the synchronous `generate` command."""

import io
import shutil

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from characters.faces import get_embedder
from characters.services import character_create, reference_add
from generation.identity import score_image
from generation.methods.base import ModelMissing
from generation.model_registry import COMPONENTS, METHOD_COMPONENTS, component_path, missing_files, require
from tests import photos


def test_build_test_models_writes_every_component(tiny_models_dir):
    for key in COMPONENTS:
        assert component_path(tiny_models_dir, key).exists(), key
    for method in METHOD_COMPONENTS:
        assert missing_files(tiny_models_dir, method) == []


@pytest.mark.parametrize(("base", "latent_channels"), [("flux", 16), ("sdxl", 4)])
def test_tiny_vaes_downsample_8x_into_the_real_latent_channels(tiny_models_dir, base, latent_channels):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(component_path(tiny_models_dir, base) / "vae")
    assert vae.config.latent_channels == latent_channels
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # the pipelines' vae_scale_factor
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 96, 64)).latent_dist.mode()
        assert latents.shape == (1, latent_channels, 12, 8)
        assert vae.decode(latents).sample.shape == (1, 3, 96, 64)


def test_tiny_identitynet_brings_the_control_image_onto_the_latent_grid(tiny_models_dir):
    import torch
    from diffusers import AutoencoderKL, ControlNetModel

    vae = AutoencoderKL.from_pretrained(component_path(tiny_models_dir, "sdxl") / "vae")
    controlnet = ControlNetModel.from_pretrained(component_path(tiny_models_dir, "instantid_controlnet"))
    control_image = torch.zeros(1, 3, 96, 64)
    with torch.no_grad():
        latents = vae.encode(control_image).latent_dist.mode()
        embedded = controlnet.controlnet_cond_embedding(control_image)
    assert embedded.shape[-2:] == latents.shape[-2:] == (12, 8)
    assert controlnet.config.in_channels == vae.config.latent_channels


def test_tiny_flux_transformer_fits_the_latents_and_its_rope(tiny_models_dir):
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(component_path(tiny_models_dir, "flux") / "transformer")
    assert config["in_channels"] == 16 * 4 and config["patch_size"] == 1  # 16 latent channels packed 2x2
    assert sum(config["axes_dims_rope"]) == config["attention_head_dim"]


def test_check_models_reports_ready_and_missing_files(tiny_models_dir, tmp_path):
    out = io.StringIO()
    call_command("check_models", "--models-dir", str(tiny_models_dir), stdout=out)
    assert "pulid_flux       ready" in out.getvalue()
    assert "instantid_sdxl   ready" in out.getvalue()

    partial = tmp_path / "models"
    shutil.copytree(tiny_models_dir, partial)
    component_path(partial, "pulid_flux_weights").unlink()
    out = io.StringIO()
    call_command("check_models", "--models-dir", str(partial), stdout=out)
    assert "pulid_flux       missing 1 file(s)" in out.getvalue()
    assert "pulid_flux_v0.9.1.safetensors" in out.getvalue() and "huggingface.co/guozinan/PuLID" in out.getvalue()


def test_missing_weights_raise_model_missing_naming_the_file(tmp_path):
    with pytest.raises(ModelMissing) as caught:
        require(tmp_path, "instantid_sdxl")
    assert caught.value.code == "model_missing"
    assert "stable-diffusion-xl-base-1.0" in caught.value.message


def test_identity_score_of_a_real_face_and_of_a_faceless_image():
    embedder = get_embedder()
    identity = embedder.analyze(photos.astronaut())[0].embedding
    mirrored = Image.fromarray(photos.astronaut()[:, ::-1].copy())
    score = score_image(mirrored, identity=identity, embedder=embedder.info.name)
    assert score.similarity > 0.95 and score.reason is None
    other = score_image(Image.fromarray(photos.tom_hanks()), identity=identity, embedder=embedder.info.name)
    assert other.similarity < 0.92
    blank = score_image(Image.new("RGB", (64, 64), "gray"), identity=identity, embedder=embedder.info.name)
    assert blank.similarity is None and blank.reason == "no_face"


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["pulid_flux", "instantid_sdxl"])
def test_generate_command_writes_scored_images(method, studio_a, media_root, tiny_models_dir, tmp_path):
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    out = io.StringIO()
    call_command(
        "generate",
        "--character", str(character.pk),
        "--method", method,
        "--prompt", "portrait in a rainy street",
        "--steps", "2",
        "--width", "64",
        "--height", "48",
        "--num-images", "2",
        "--seed", "7",
        "--out", str(tmp_path / "out"),
        "--models-dir", str(tiny_models_dir),
        stdout=out,
    )  # fmt: skip
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == [f"eileen-{method}-seed7.png", f"eileen-{method}-seed8.png"]
    for file in files:
        assert Image.open(file).size == (64, 48)
    assert np.asarray(Image.open(files[0])).std() > 0  # an image, not a blank
    # Random tiny networks draw no face: the score says so instead of inventing a number.
    assert out.getvalue().count("identity n/a (no_face)") == 2


@pytest.mark.django_db
def test_generate_command_errors_are_clear(studio_a, tmp_path):
    with pytest.raises(CommandError, match="No character"):
        call_command("generate", "--character", "999", "--prompt", "x", "--out", str(tmp_path))
    character = character_create(tenant=studio_a.tenant, name="No photos")
    with pytest.raises(CommandError, match="model_missing"):
        call_command(
            "generate", "--character", str(character.pk), "--prompt", "x", "--out", str(tmp_path),
            "--models-dir", str(tmp_path / "empty"),
        )  # fmt: skip
