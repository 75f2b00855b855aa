"""Per-step cost of loop hooks: a pipeline whose denoiser costs nothing, with 0 and with 5 hook objects that
each implement every step-level hook point.

    python benchmarks/hook_overhead.py [--steps 2000]

Target: under 50 microseconds per step with 5 implementations. (diffusers has no hook points to compare.)
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from toy import ToyModel, ToyPipeline, ToyScheduler  # noqa: E402

from diffloom import hookimpl  # noqa: E402


class Free(ToyPipeline):
    def run_denoiser(self, call, step):
        return step.model_input


class Hook:
    @hookimpl
    def on_step_begin(self, pipe, call, step):
        pass

    @hookimpl
    def before_denoiser(self, pipe, call, step):
        pass

    @hookimpl
    def after_denoiser(self, pipe, call, step):
        pass

    @hookimpl
    def on_step_end(self, pipe, call, step):
        pass


def per_step(pipe, steps, hooks, callback=None):
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        pipe(steps=steps, hooks=hooks, callback_on_step_end=callback)
        best = min(best, time.perf_counter() - start)
    return best / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = Free(ToyModel(), ToyScheduler())
    pipe.set_progress_bar_config(disable=True)
    bare = per_step(pipe, args.steps, [])
    five = per_step(pipe, args.steps, [Hook() for _ in range(5)])
    with_cb = per_step(pipe, args.steps, [], callback=lambda p, i, t, kw: kw)
    print(f"{'configuration':<40} {'us/step':>8}")
    print(f"{'loop, no hooks':<40} {bare * 1e6:8.1f}")
    print(f"{'loop, 5 hook objects x 4 points':<40} {five * 1e6:8.1f}")
    print(f"{'loop, diffusers callback_on_step_end':<40} {with_cb * 1e6:8.1f}")
    print(f"\nhook overhead with 5 implementations: {(five - bare) * 1e6:.1f} us/step (target < 50)")


if __name__ == "__main__":
    main()
