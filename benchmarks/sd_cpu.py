"""diffloom vs diffusers on CPU: a tiny Stable Diffusion pipeline, end to end and per-step framework overhead.

Both libraries load the same folder (written by diffusers) and run the same call. The models are tiny, so the
time spent outside the UNet, the VAE and the text encoder (prompt handling, the loop, the scheduler, hooks,
pre/post-processing) is a visible part of the total: that is the framework overhead reported per step.

    python benchmarks/sd_cpu.py [--steps 25] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tiny  # noqa: E402


class ModelClock:
    """Accumulates wall time spent inside the UNet, the VAE (encode/decode) and the text encoder."""

    def __init__(self, pipe):
        self.seconds = 0.0
        self._start = None
        for module in (pipe.unet, pipe.text_encoder):
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._leave)
        for name in ("encode", "decode"):
            setattr(pipe.vae, name, self._timed(getattr(pipe.vae, name)))

    def _enter(self, *_):
        self._start = time.perf_counter()

    def _leave(self, *_):
        self.seconds += time.perf_counter() - self._start

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def measure(pipe, steps: int, repeats: int) -> dict:
    clock = ModelClock(pipe)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo of the red cat", num_inference_steps=steps, height=tiny.IMAGE_HEIGHT,
                  width=tiny.IMAGE_WIDTH, output_type="np")
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))  # warm-up
    totals, overheads = [], []
    for i in range(repeats):
        clock.seconds = 0.0
        start = time.perf_counter()
        pipe(**kwargs, generator=torch.Generator().manual_seed(i))
        total = time.perf_counter() - start
        totals.append(total)
        overheads.append((total - clock.seconds) / steps)
    return {"total": statistics.median(totals), "overhead": statistics.median(overheads)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noise)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import diffusers

    from diffloom import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny.save_sd_folder(Path(tmp) / "tiny-sd")
        contenders = {
            "diffusers": diffusers.StableDiffusionPipeline.from_pretrained(folder),
            "diffloom": StableDiffusionPipeline.from_pretrained(folder),
        }
        # Alternate the runs so that a busy machine slows both alike.
        results = {name: [] for name in contenders}
        for _ in range(2):
            for name, pipe in contenders.items():
                results[name].append(measure(pipe, args.steps, args.repeats))

    print(f"\ntiny Stable Diffusion, {tiny.IMAGE_HEIGHT}x{tiny.IMAGE_WIDTH}, {args.steps} steps, CFG on, "
          f"CPU, {args.threads} thread(s); median of {args.repeats} runs x 2 rounds")
    print(f"{'library':<10} {'end to end (ms)':>16} {'overhead per step (ms)':>24}")
    for name, runs in results.items():
        total = min(r["total"] for r in runs) * 1e3
        overhead = min(r["overhead"] for r in runs) * 1e3
        print(f"{name:<10} {total:>16.1f} {overhead:>24.3f}")


if __name__ == "__main__":
    main()
