"""`diffloom batch` on the CPU with the shipped model: items per second with 1 worker and with 2 workers.

Each run is the real command in a fresh process on a fresh output folder: 1 worker is the local engine, N workers
are torch.distributed (gloo) processes started with `--engine torchrun --workers N`. Every worker computes with one
thread, so N workers use N cores. Reported per run: the generation rate (the command's own progress line, timed
from when every pipeline is loaded), the wall time of the whole command (process start and model loading
included), and whether the images are byte-identical to the 1-worker run's.

    python benchmarks/batch_cpu.py [--items 16] [--steps 20] [--size 128] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_job(prompts: Path, out: Path, workers: int, steps: int, size: int) -> dict:
    engine = ["--engine", "local"] if workers == 1 else ["--engine", "torchrun", "--workers", str(workers)]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "diffloom", "batch", str(prompts), "--out", str(out),
                             "--steps", str(steps), "--size", str(size), *engine], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"batch with {workers} workers failed:\n{result.stderr}")
    rate = float(re.findall(r"([\d.]+) images/s", result.stderr)[-1])
    images = {p.name: p.read_bytes() for p in out.glob("*.png")}
    return {"workers": workers, "images_per_s": rate, "wall_s": wall, "images": images}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    shapes = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp, "prompts.jsonl")
        prompts.write_text("".join(json.dumps({"prompt": f"{shapes[i % 4]} on a white background"}) + "\n"
                                   for i in range(args.items)))
        print(f"{args.items} items, {args.steps} steps, {args.size}x{args.size}, shipped shapes-128, CPU")
        print(f"{'workers':>7}  {'images/s':>8}  {'speed-up':>8}  {'wall s':>6}  same bytes as 1 worker")
        first = None
        for workers in args.workers:
            result = run_job(prompts, Path(tmp, f"out-{workers}"), workers, args.steps, args.size)
            first = first or result
            same = result["images"] == first["images"]
            print(f"{workers:>7}  {result['images_per_s']:>8.2f}  "
                  f"{result['images_per_s'] / first['images_per_s']:>8.2f}  {result['wall_s']:>6.1f}  {same}")


if __name__ == "__main__":
    main()
