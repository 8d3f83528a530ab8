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


def _clock() -> tuple[float, float, float]:
    """(wall, CPU of the calling thread, CPU of the whole process) in seconds."""
    return time.perf_counter(), time.thread_time(), time.process_time()


def measure(*, tenant, character, fields: dict, photo: Image.Image, image_s: float, repeat: int) -> dict:
    """The worker's job against `generate_for_character` on the same stand-in, interleaved in pairs.

    Each round runs, back to back in this thread, `generate_for_character` (references + identity +
    scoring each image; no PNG: that is the worker's) and then the real `worker.run_job` of a fresh
    queued job with the same number of images (claim, notify, a `StepGuard` per step, generation with
    PNG encoding, storage, the finishing transaction; the submit not timed). `repeat` rounds with 1
    image and `repeat // 2` (at least 2) with 4 images, after one warm-up round each. A pair shares the
    machine's load of the moment (this VM is shared), so pairs are compared, not separate series.

    Per run, in seconds: `wall_beyond_device` (wall time minus the stand-in's device time),
    `thread_cpu` (CPU time of this thread: the GPU process's critical path, which also runs the
    stand-in's own per-step Python) and `process_cpu` (every thread of the process: + the scoring and
    PNG threads and the lease keeper), and the 1-minute load average after the run.
    """
    import os

    from django.conf import settings

    from generation import worker
    from generation.jobs import generation_submit
    from generation.methods.base import GenerationRequest
    from generation.services import generate_for_character

    stand_in = GpuSizedStandIn(photo, image_s)

    def queued_job(images: int) -> int:
        with mock.patch("generation.jobs.enqueue"):  # run below, not by a cluster
            job, _ = generation_submit(tenant=tenant, character=character, **{**fields, "num_images": images})
        return job.pk

    def timed(fn, images: int) -> dict:
        wall, thread, process = _clock()
        fn()
        end_wall, end_thread, end_process = _clock()
        return {
            "wall_beyond_device": end_wall - wall - images * image_s,
            "thread_cpu": end_thread - thread,
            "process_cpu": end_process - process,
            "load_1min": os.getloadavg()[0],
        }

    def rounds(images: int, count: int) -> dict:
        request = GenerationRequest(
            references=[], prompt=fields["prompt"], width=1024, height=1024, steps=28, seed=1, num_images=images
        )
        pairs = {"generate_for_character": [], "run_job": []}
        for index in range(count + 1):
            job_id = queued_job(images)
            gfc = timed(lambda: generate_for_character(character=character, method=stand_in, request=request), images)
            run = timed(lambda job_id=job_id: _assert_succeeded(worker.run_job(job_id), job_id), images)
            if index:  # the first round warms both paths
                pairs["generate_for_character"].append(gfc)
                pairs["run_job"].append(run)
        return pairs

    # The worker's cache holds the stand-in under the job's method for the duration of the measurement.
    cache = worker.pipeline_cache()
    key = f"{fields['method']}@{settings.ALKEMY_MODELS_DIR}"
    saved = cache._entries.get(key)
    cache._entries[key] = (stand_in, 0)
    try:
        return {"1_image": rounds(1, repeat), "4_images": rounds(4, max(2, repeat // 2))}
    finally:
        if saved is None:
            cache._entries.pop(key, None)
        else:
            cache._entries[key] = saved


def _assert_succeeded(status: str, job_id: int) -> None:
    assert status == "succeeded", (job_id, status)


def summarize(pairs: dict, image_s: float, reference_s: float) -> dict:
    """Per number of images: the worker's overhead beyond `generate_for_character`, in ms and in % of
    the reference GPU job (`reference_s` per image), three ways:

    - `wall_paired`: run_job minus the generate_for_character of the same round (median, min, max of
      the rounds): what the worker adds in wall time on this machine, contention included;
    - `wall_min`: the fastest run_job minus the fastest generate_for_character: each path when this
      machine's other load preempted it least (a shared VM only ever adds time);
    - `thread_cpu_paired`: CPU time of the job's thread beyond that of generate_for_character's (median):
      the worker's own work on the GPU process's critical path (DB, notifications, step guards,
      storage), free of what other processes take; it leaves out waiting on the database server and on
      the PNG thread.
    Also the PNG thread's CPU (process CPU beyond the thread's, beyond the same for
    generate_for_character) and the loads.
    """
    import statistics

    out = {}
    for name, runs in pairs.items():
        images = 1 if name == "1_image" else 4
        gfc, job = runs["generate_for_character"], runs["run_job"]

        def series(kind: list[dict], field: str) -> list[float]:
            return [run[field] * 1000 for run in kind]

        wall_diff = [
            j - g for j, g in zip(series(job, "wall_beyond_device"), series(gfc, "wall_beyond_device"), strict=True)
        ]
        cpu_diff = [j - g for j, g in zip(series(job, "thread_cpu"), series(gfc, "thread_cpu"), strict=True)]
        background = [
            (j["process_cpu"] - j["thread_cpu"] - g["process_cpu"] + g["thread_cpu"]) * 1000
            for j, g in zip(job, gfc, strict=True)
        ]
        base_ms = images * reference_s * 1000

        def pct(ms: float, base_ms: float = base_ms) -> float:
            return round(ms / base_ms * 100, 2)

        paired = statistics.median(wall_diff)
        fastest = min(series(job, "wall_beyond_device")) - min(series(gfc, "wall_beyond_device"))
        cpu = statistics.median(cpu_diff)
        out[name] = {
            "rounds": len(job),
            "generate_for_character_beyond_device_ms": _spread(series(gfc, "wall_beyond_device")),
            "run_job_beyond_device_ms": _spread(series(job, "wall_beyond_device")),
            "wall_paired_ms": {**_spread(wall_diff), "pct_of_reference_job": pct(paired)},
            "wall_min_ms": {"value": round(fastest, 1), "pct_of_reference_job": pct(fastest)},
            "thread_cpu_paired_ms": {**_spread(cpu_diff), "pct_of_reference_job": pct(cpu)},
            "png_thread_cpu_ms": _spread(background),
            "run_job_beyond_device_pct_of_reference_job": pct(statistics.median(series(job, "wall_beyond_device"))),
            "load_1min": _spread([run["load_1min"] for run in job], digits=2),
        }
    return out


def _spread(values: list[float], digits: int = 1) -> dict:
    import statistics

    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }
