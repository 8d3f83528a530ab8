"""CLI: build the bases, run our trainer per base and variant, run the stock anchor, print one JSON report."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: wall-clock goals for a 1000-step LoRA on one H100/H200 (minutes)
GOALS_MIN = {"sdxl": 3.0, "flux": 5.0}
#: stock diffusers LoRA r16 train step, 1024², batch 1, H200 (shared/DESIGN.md, gpu_anchor.py)
STOCK_H200_S_PER_STEP = {"sdxl": 0.42, "flux": 0.50}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_anchor(path: Path, *, tiny: bool, timeout: int) -> dict:
    """../shared/tools/gpu_anchor.py's stock LoRA train steps, cuDNN attention off as for our trainer."""
    if not path.exists():
        return {"skipped": f"{path} not found"}
    env = {**os.environ, "NO_CUDNN_SDP": "1", **({"TINY": "1"} if tiny else {})}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout)
        stdout, rc, tail = done.stdout, done.returncode, done.stderr[-1500:]
    except subprocess.TimeoutExpired as exc:
        stdout, rc, tail = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else "", "timeout", ""
    results = []
    for line in stdout.splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            continue
    report = {"path": str(path), "rc": rc, "wall_s": round(time.perf_counter() - started, 1), "results": results}
    if rc != 0:
        report["stderr_tail"] = tail
    return report


def measure_variants() -> list[str]:
    from bench.training.measure import VARIANTS

    return list(VARIANTS)


def main() -> None:
    parser = argparse.ArgumentParser(description="LoRA training speed through our trainer (see bench/training).")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64², a few steps: a smoke run")
    parser.add_argument("--only", choices=["sdxl", "flux"])
    parser.add_argument("--variants", default=None, help="comma list of " + ",".join(measure_variants()))
    parser.add_argument("--resolution", type=int, default=None, help="default 1024 (tiny 64)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
    parser.add_argument("--references", type=int, default=None, help="reference photos (default 5; tiny 1)")
    parser.add_argument("--log-every", type=int, default=10, help="loss read back every N steps")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--anchor", type=Path, default=ROOT.parent / "shared" / "tools" / "gpu_anchor.py")
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--anchor-timeout", type=int, default=420)
    parser.add_argument("--cpu-threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    variants = (args.variants or ("eager" if args.tiny else "eager,compiled,compiled_bf16")).split(",")
    resolution = args.resolution or (64 if args.tiny else 1024)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    steps = args.steps or (3 if args.tiny else 20)
    references = args.references or (1 if args.tiny else 5)

    import torch

    report = {"device": args.device, "host": platform.node(), "torch": torch.__version__, "tiny": args.tiny,
              "resolution": resolution, "rank": args.rank, "warmup": warmup, "timed_steps": steps}  # fmt: skip
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report["skipped"] = "CUDA is not available; run with --device cpu --tiny for a smoke run"
        print(json.dumps(report, indent=2))
        return
    if args.device == "cpu":
        torch.set_num_threads(args.cpu_threads)
    else:
        report["gpu"] = torch.cuda.get_device_name(0)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="alkemy-bench-training-"))

    from bench.gpu_methods import free_memory, setup_django

    os.environ.setdefault("SECRET_KEY", "bench-only-not-a-secret")  # settings demand one; no database is used
    setup_django(work_dir)
    import diffusers

    from bench.training import measure, models

    report["diffusers"] = diffusers.__version__
    if not args.no_anchor:
        log(f"anchor: {args.anchor}")
        report["anchor"] = run_anchor(args.anchor, tiny=args.tiny, timeout=args.anchor_timeout)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    build = models.builder(work_dir / "models", tiny=args.tiny, device=args.device, dtype=dtype)
    results: dict[str, list] = {}
    for base_model in [args.only] if args.only else ["sdxl", "flux"]:
        models.write_base(build, base_model)
        for name in variants:
            log(f"{base_model} {name}: building the random denoiser, training {warmup}+{steps} steps")
            components = models.random_denoiser(build, base_model)
            try:
                row = measure.run(
                    base_model=base_model, models_dir=work_dir / "models", components=components,
                    variant=measure.VARIANTS[name], device=args.device, resolution=resolution, rank=args.rank,
                    warmup=warmup, steps=steps, references=references, log_every=args.log_every,
                )  # fmt: skip
            except torch.cuda.OutOfMemoryError as exc:
                row = {"variant": name, "error": f"out of memory: {str(exc)[:300]}"}
            log(f"{base_model} {name}: {json.dumps(row)}")
            results.setdefault(base_model, []).append(row)
            del components
            torch._dynamo.reset()
            gc.collect()
            free_memory()
    report["results"] = results
    if not args.tiny:
        report["goals"] = {
            base: {"goal_min": GOALS_MIN[base], "stock_h200_s_per_step": STOCK_H200_S_PER_STEP[base],
                   "best_projected_min": min((r["projected_1000_steps_min"] for r in rows
                                              if "projected_1000_steps_min" in r), default=None)}
            for base, rows in results.items()
        }  # fmt: skip
        for goal in report["goals"].values():
            goal["met"] = goal["best_projected_min"] is not None and goal["best_projected_min"] <= goal["goal_min"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
