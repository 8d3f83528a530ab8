"""Worker overhead: an output is identity-scored and PNG-encoded while the next image denoises.

The tiny InstantID method runs for real on the CPU; the face embedder is the real dlib one,
wrapped only to record when it runs (and, where said, to take as long as scoring a 1024x1024
output does, so that the overlap is visible on 64x64 images).
"""

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from alkemy.jobs import JobStatus
from characters.faces import get_embedder
from characters.services import character_create, reference_add
from generation.identity import score_image
from generation.jobs import generation_submit
from generation.methods.base import GenerationRequest
from generation.models import GeneratedImage, GenerationJob
from generation.references import character_identity
from generation.services import PNG_COMPRESS_LEVEL, encode_png, generate_for_character, load_method
from generation.tasks import run_generation_job
from generation.worker import JobCanceled
from tests import photos

pytestmark = pytest.mark.django_db

SCORING_SECONDS = 0.3  # about what dlib takes on a 1024x1024 output on a small CPU
STEPS = 2  # per image


@pytest.fixture
def eileen(studio_a, media_root, settings, tiny_models_dir):
    settings.ALKEMY_MODELS_DIR = tiny_models_dir
    settings.ALKEMY_FACE_EMBEDDER = "dlib"
    character = character_create(tenant=studio_a.tenant, name="Eileen")
    reference_add(character=character, upload=photos.upload(photos.astronaut()))
    return character


@pytest.fixture
def scoring_log(monkeypatch):
    """Every identity scoring: (thread name, started, ended), perf_counter seconds. Steered by `fail`,
    `slow`, and `hold_until`: an event the first scoring waits for (at most a minute) after it ran."""
    embedder = get_embedder("dlib")
    real_analyze = embedder.analyze
    log = {"calls": [], "slow": False, "fail": False, "hold_until": None, "held": []}

    def analyze(image):
        started = time.perf_counter()
        if log["fail"]:
            raise RuntimeError("the face embedder broke")
        faces = real_analyze(image)
        if log["slow"]:
            time.sleep(SCORING_SECONDS)
        if log["hold_until"] is not None and not log["held"]:
            log["held"].append(log["hold_until"].wait(60))
        log["calls"].append((threading.current_thread().name, started, time.perf_counter()))
        return faces

    monkeypatch.setattr(embedder, "analyze", analyze)
    return log


def request(**overrides) -> GenerationRequest:
    fields = dict(references=[], prompt="walking in the rain", width=64, height=64, steps=STEPS, seed=11, num_images=3)
    return GenerationRequest(**{**fields, **overrides})


def background_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("identity-score", "png-encode"))]


def test_an_image_is_scored_while_the_next_one_denoises(eileen, scoring_log):
    second_image_denoising = threading.Event()
    scoring_log["hold_until"] = second_image_denoising  # scoring image 1 ends only once image 2 denoises

    def on_step(step: int, total: int) -> None:  # called by the real denoising loop, in the main thread
        if step > STEPS:
            second_image_denoising.set()

    outputs = generate_for_character(
        character=eileen, method=load_method("instantid_sdxl"), request=request(), with_png=True, on_step=on_step
    )

    assert [o.seed for o in outputs] == [11, 12, 13]
    # image 2 reached its first denoising step while image 1 was still being scored (done one after
    # the other, the scoring would have waited its full minute in vain)
    assert scoring_log["held"] == [True]
    assert [name.split("_")[0] for name, _, _ in scoring_log["calls"]] == ["identity-score"] * 3
    # the scores are those of scoring each output on its own, after the fact
    identity = character_identity(character=eileen, embedder="dlib")
    for output in outputs:
        assert output.score == score_image(output.image, identity=identity, embedder="dlib")
    assert not background_threads()


def test_the_png_is_lossless_at_the_fast_level(eileen, scoring_log):
    outputs = generate_for_character(
        character=eileen, method=load_method("instantid_sdxl"), request=request(num_images=2), with_png=True
    )
    assert PNG_COMPRESS_LEVEL <= 3
    for output in outputs:
        decoded = Image.open(io.BytesIO(output.png))
        assert decoded.format == "PNG" and decoded.size == output.image.size
        assert np.array_equal(np.asarray(decoded.convert(output.image.mode)), np.asarray(output.image))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_encode_png_round_trips_every_mode(mode):
    # RGB/RGBA/L are written by encode_png itself (Up filter, zlib RLE), the rest by Pillow; odd sizes
    # check the row stride, noise checks that the Up filter wraps modulo 256.
    noise = np.random.default_rng(3).integers(0, 256, (37, 53, 4), dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(noise[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(noise, "RGBA").convert(mode)
    decoded = Image.open(io.BytesIO(encode_png(image)))
    decoded.load()
    assert decoded.format == "PNG" and decoded.mode == image.mode and decoded.size == image.size
    assert np.array_equal(np.asarray(decoded), np.asarray(image))
    if mode == "P":
        assert decoded.getpalette() == image.getpalette()


def test_a_job_stores_the_generated_pixels_and_their_scores(eileen, scoring_log, media_root):
    job, _ = generation_submit(
        tenant=eileen.tenant, character=eileen, prompt="walking in the rain", width=64, height=64, steps=STEPS,
        seed=11, num_images=2, method="instantid_sdxl",
    )  # fmt: skip
    assert run_generation_job(job.pk) == JobStatus.SUCCEEDED
    # the same seeds again, in-process: the method is deterministic per seed
    expected = generate_for_character(
        character=eileen, method=load_method("instantid_sdxl"), request=request(num_images=2)
    )
    stored = list(GeneratedImage.objects.unscoped().filter(job=job).order_by("index"))
    assert [s.seed for s in stored] == [11, 12]
    for row, output in zip(stored, expected, strict=True):
        with row.file.open("rb") as handle:
            assert np.array_equal(
                np.asarray(Image.open(handle).convert("RGB")), np.asarray(output.image.convert("RGB"))
            )
        assert (row.identity_similarity, row.identity_reason or None) == (output.score.similarity, output.score.reason)
    assert not background_threads()


def test_a_cancel_while_the_previous_image_is_scored_stops_without_leaving_threads(eileen, scoring_log):
    scoring_log["slow"] = True

    def cancel_in_the_second_image(step: int, total: int) -> None:
        if step == STEPS + 1:  # the first step of image 2 of 3, while image 1 is still being scored
            raise JobCanceled()

    with pytest.raises(JobCanceled):
        generate_for_character(
            character=eileen, method=load_method("instantid_sdxl"), request=request(), with_png=True,
            on_step=cancel_in_the_second_image,
        )  # fmt: skip
    assert len(scoring_log["calls"]) == 1  # image 1's scoring ran to its end; nothing else was started
    assert not background_threads()


def test_a_scoring_failure_fails_the_job_and_keeps_no_files(eileen, scoring_log, media_root):
    scoring_log["fail"] = True
    job, _ = generation_submit(
        tenant=eileen.tenant, character=eileen, prompt="walking in the rain", width=64, height=64, steps=STEPS,
        seed=11, num_images=3, method="instantid_sdxl",
    )  # fmt: skip
    assert run_generation_job(job.pk) == JobStatus.FAILED
    failed = GenerationJob.objects.unscoped().get(pk=job.pk)
    assert failed.error_code == "internal_error" and "the face embedder broke" in failed.error_message
    assert not GeneratedImage.objects.unscoped().filter(job=job).exists()
    assert not list(media_root.glob("tenants/*/generations/**/*.png"))
    assert not background_threads()
