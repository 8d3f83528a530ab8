"""Enrolment speed (issue #13): seconds per 1-MP photo on one core, and bulk-import throughput on all cores.

    .venv/bin/python bench/enrolment.py                      # 3 runs of each, 40 photos per bulk run
    .venv/bin/python bench/enrolment.py --repeat 5 --photos 80 --workers 2

1. Per photo, in this process (one core): `photo_analyse_bytes` of 1-MP JPEGs, what a single upload and
   every import worker run (decode, EXIF, detection, landmarks, 128-d embedding, quality figures), and
   the detection + landmarks + embedding alone, the new way (`analyze`: coarse scan first) and the old
   (`detect_full`). Two sets: portraits (the 8 sample people scaled to 1 MP: the face is large, the
   coarse scan is trusted) and scenes (each person pasted small into a 1-MP scene: the full scan runs).
   CPU seconds of this thread are reported next to wall seconds: the machine is shared, and CPU time
   is what "on one core" means; both are medians over the runs.
2. Bulk: `characters.imports.import_run` of a folder layout (one folder per character, 1-5 photos) into
   a fresh tenant each run, face work on `--workers` processes (default one per core), database writes
   in this one, as `manage.py import_characters` does. Wall photos/s per run.

Runs on the embedded PostgreSQL of `--data-dir` (a fresh `bench_enrolment` database), which it stops
afterwards when it started it. Prints `uptime` before and after: the figures depend on the load.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread, set before numpy loads OpenBLAS: "one core" per photo, and the import pool has a worker per core.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.job_queue import bench_env, django_setup, postmaster_pid, recreate_database, stop_postmaster  # noqa: E402


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one_megapixel(pixels: np.ndarray) -> np.ndarray:
    from PIL import Image

    height, width = pixels.shape[:2]
    factor = (1_000_000 / (height * width)) ** 0.5
    return np.asarray(Image.fromarray(pixels).resize((round(width * factor), round(height * factor)), Image.BICUBIC))


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def photo_sets() -> dict[str, list[bytes]]:
    """Portraits: the sample people at 1 MP. Scenes: each pasted 380 px wide into a 1-MP skimage scene."""
    from PIL import Image
    from skimage import data

    from tests import photos

    people = list(photos.people().values())
    scenes = [one_megapixel(s) for s in (data.coffee(), data.chelsea(), data.rocket())]
    portraits = [jpeg(one_megapixel(p)) for p in people]
    pasted = []
    for index, person in enumerate(people):
        scene = scenes[index % len(scenes)].copy()
        small = np.asarray(Image.fromarray(person).resize((380, 380 * person.shape[0] // person.shape[1])))
        y, x = 80 + 20 * index, 120 + 60 * index
        h, w = min(small.shape[0], scene.shape[0] - y), min(small.shape[1], scene.shape[1] - x)
        scene[y : y + h, x : x + w] = small[:h, :w]
        pasted.append(jpeg(scene))
    return {"portraits": portraits, "scenes": pasted}


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def per_photo(sets: dict[str, list[bytes]], repeat: int) -> None:
    from characters.faces import get_embedder
    from characters.photos import load_photo
    from characters.services import photo_analyse_bytes

    embedder = get_embedder("dlib")
    print(f"\nPer photo, one core, median of {repeat} runs per photo (seconds: wall / CPU of this thread)")
    for name, photos in sets.items():
        figures: dict[str, list[tuple[float, float]]] = {"photo_analyse": [], "analyze": [], "detect_full (old)": []}
        for data in photos:
            pixels = load_photo(data).pixels
            runs = {key: [] for key in figures}
            for _ in range(repeat):
                runs["photo_analyse"].append(timed(lambda data=data: photo_analyse_bytes(data=data)))
                runs["analyze"].append(timed(lambda pixels=pixels: embedder.analyze(pixels)))
                runs["detect_full (old)"].append(timed(lambda pixels=pixels: embedder.detect_full(pixels)))
            for key, values in runs.items():
                figures[key].append((statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)))
        print(f"  {name} ({len(photos)} photos, ~1 MP):")
        for key, values in figures.items():
            walls, cpus = [v[0] for v in values], [v[1] for v in values]
            print(f"    {key:20s} wall mean {statistics.mean(walls):.3f} s (min {min(walls):.3f}, max {max(walls):.3f})"
                  f" | CPU mean {statistics.mean(cpus):.3f} s (min {min(cpus):.3f}, max {max(cpus):.3f})")  # fmt: skip


def layout(photos: list[bytes], count: int, root: Path) -> int:
    """`count` distinct photos (re-encoded variants of `photos`) in folders of 1-5 photos."""
    from PIL import Image, ImageEnhance

    written, character = 0, 0
    while written < count:
        character += 1
        folder = root / f"Character {character:03d}"
        folder.mkdir(parents=True)
        base = Image.open(io.BytesIO(photos[character % len(photos)])).convert("RGB")
        for index in range(min(1 + character % 5, count - written)):
            variant = ImageEnhance.Brightness(base).enhance(0.85 + 0.05 * index + 0.001 * character)
            (folder / f"{index}.jpg").write_bytes(jpeg(np.asarray(variant), 88))
            written += 1
    return character


def bulk(photos: list[bytes], count: int, repeat: int, workers: int | None) -> None:
    from alkemy.tenancy.scoping import tenant_scope
    from alkemy.tenancy.services import tenant_create
    from characters.imports import entries_from_directory, import_run

    with tempfile.TemporaryDirectory() as folder:
        characters = layout(photos, count, Path(folder))
        entries = entries_from_directory(Path(folder))
        print(f"\nBulk import: {len(entries)} photos (~1 MP) in {characters} folders, workers={workers or 'cores'}")
        rates = []
        for run in range(repeat):
            tenant = tenant_create(slug=f"bench-import-{run}-{int(time.time())}", name="Bench import")
            with tenant_scope(tenant):
                start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
                result = import_run(tenant=tenant, entries=entries, workers=workers)
                seconds = time.perf_counter() - start
                cpu, children = time.process_time() - cpu, _children_cpu() - children
            counts = result.counts()
            rates.append(len(entries) / seconds)
            per_photo_cpu = (cpu + children) / len(entries)
            print(f"  run {run + 1}: CPU s per photo: this process (writes) {cpu / len(entries):.3f}, workers "
                  f"(analysis) {children / len(entries):.3f}; an idle {os.cpu_count()}-core machine would do at most "
                  f"{os.cpu_count() / per_photo_cpu:.1f} photos/s (PostgreSQL's CPU not counted)")  # fmt: skip
            outcome = f"enrolled {counts['enrolled_count']}, refused {counts['refused_count']} {result.refusals()}"
            print(f"  run {run + 1}: {seconds:.1f} s, {rates[-1]:.2f} photos/s ({outcome})")
        print(f"  photos/s: mean {statistics.mean(rates):.2f}, min {min(rates):.2f}, max {max(rates):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--photos", type=int, default=40, help="photos per bulk run")
    parser.add_argument("--workers", type=int, default=None, help="bulk analysis processes (default: one per core)")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/bench-enrolment"))
    parser.add_argument("--skip-bulk", action="store_true")
    args = parser.parse_args()

    args.data_dir.mkdir(parents=True, exist_ok=True)
    django_setup(bench_env(args.data_dir, "bench_enrolment", None))
    from django.conf import settings

    pgdata = Path(settings.DATABASES["default"]["PGDATA"])
    ours = postmaster_pid(pgdata) is None
    print("load before:", uptime())
    try:
        sets = photo_sets()
        per_photo(sets, args.repeat)
        if not args.skip_bulk:
            from django.core.management import call_command

            recreate_database("bench_enrolment")
            call_command("migrate", verbosity=0)
            bulk(sets["portraits"], args.photos, args.repeat, args.workers)
    finally:
        print("load after:", uptime())
        if ours:
            from django.db import connections

            connections.close_all()
            stop_postmaster(pgdata)


if __name__ == "__main__":
    main()
