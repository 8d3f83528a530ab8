"""Worker overhead on a GPU-sized job, measured through the real worker with a stand-in method.

`bench/job_queue.py` calls `measure()` in its broker child (Django set up, the benchmark
character enrolled). The real `generation.worker.run_job` runs real job rows end to end (claim,
notify, a `StepGuard` per step, `generate_for_character` with its background scoring and PNG
encoding, storage, the finishing transaction) with one thing replaced: the method is
`GpuSizedStandIn`, which takes a fixed "device time" per image and returns a 1024x1024 photo
with a face, so that scoring and encoding cost what they cost on a real output. What the worker
adds is the wall time minus that device time; it is projected onto the reference GPU job
(`REFERENCE_GPU_JOB_S` per image) as a percentage.

The stand-in is shorter than a real GPU image (`image_s`, default 1 s instead of ~5 s) to keep the
benchmark short. That is pessimistic for the overlap: the CPU work on image i must fit in the
device time of image i+1 to be hidden.
"""

from __future__ import annotations

import time
from unittest import mock

from PIL import Image

#: the share of each step spent in Python holding the GIL: an eager denoising loop launches its
#: kernels from Python; a scorer thread that holds the GIL (dlib does) delays those launches.
LAUNCH_SHARE = 0.1


class GpuSizedStandIn:
    """A method shaped like a GPU job: `steps` steps per image, each spinning in Python for
    `LAUNCH_SHARE` of the step and sleeping the rest (the GPU computing), then a 1024x1024 photo."""

    key = "gpu_sized_stand_in"
    embedding_space = None

    def __init__(self, photo: Image.Image, image_s: float, steps: int = 28) -> None:
        self.photo, self.image_s, self.steps = photo, image_s, steps

    def generate(self, request, on_step=None) -> list[Image.Image]:
        step_s = self.image_s / self.steps
        for step in range(1, self.steps + 1):
            spin_until = time.perf_counter() + step_s * LAUNCH_SHARE
            while time.perf_counter() < spin_until:
                pass
            time.sleep(step_s * (1 - LAUNCH_SHARE))
            if on_step is not None:
                on_step(step, self.steps)
        return [self.photo.copy()]


def measure(*, tenant, character, fields: dict, photo: Image.Image, image_s: float, repeat: int) -> dict:
    """Seconds beyond the stand-in's device time, per run (`repeat` runs after one warm-up; half as
    many with 4 images):

    - `generate_for_character_1_image`: references + identity of the character + scoring the image;
    - `run_job_1_image` / `run_job_4_images`: the whole worker job (claim to finish, the submit not
      timed), as a queued worker runs it.
    """
    from django.conf import settings

    from generation import worker
    from generation.jobs import generation_submit
    from generation.methods.base import GenerationRequest
    from generation.services import generate_for_character

    stand_in = GpuSizedStandIn(photo, image_s)
    request = GenerationRequest(references=[], prompt=fields["prompt"], width=1024, height=1024, steps=28, seed=1)

    def beyond_device(fn, images: int, prepare=lambda: None) -> list[float]:
        times = []
        for _ in range((repeat if images == 1 else max(2, repeat // 2)) + 1):
            argument = prepare()
            started = time.perf_counter()
            fn(argument)
            times.append(time.perf_counter() - started - images * image_s)
        return times[1:]

    def queued_job(images: int):
        with mock.patch("generation.jobs.enqueue"):  # run below, not by a cluster
            job, _ = generation_submit(tenant=tenant, character=character, **{**fields, "num_images": images})
        return job.pk

    def run_job(job_id: int) -> None:
        assert worker.run_job(job_id) == "succeeded", job_id

    # The worker's cache holds the stand-in under the job's method for the duration of the measurement.
    cache = worker.pipeline_cache()
    key = f"{fields['method']}@{settings.ALKEMY_MODELS_DIR}"
    saved = cache._entries.get(key)
    cache._entries[key] = (stand_in, 0)
    try:
        result = {
            "generate_for_character_1_image": beyond_device(
                lambda _: generate_for_character(character=character, method=stand_in, request=request), 1
            ),
            "run_job_1_image": beyond_device(run_job, 1, lambda: queued_job(1)),
            "run_job_4_images": beyond_device(run_job, 4, lambda: queued_job(4)),
        }
    finally:
        if saved is None:
            cache._entries.pop(key, None)
        else:
            cache._entries[key] = saved
    return result
