"""Per-step scheduler overhead on the CPU: diffloom next to diffusers, 4x64x64 latents, in one run.

    python benchmarks/scheduler_step.py [--steps 25] [--repeat 20]

Each row times a full sampling loop (set_timesteps, scale_model_input and step for every timestep) with a
model output that costs nothing, and reports microseconds per step (the best of `--repeat` loops).
"""

import argparse
import inspect
import time

import diffusers
import torch

import diffloom

NAMES = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
         "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
         "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler"]


def per_step(scheduler, steps, repeat):
    sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    output = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    stochastic = "generator" in inspect.signature(scheduler.step).parameters
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        scheduler.set_timesteps(steps)
        x = sample * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            kwargs = {"generator": torch.Generator().manual_seed(2)} if stochastic else {}
            x = scheduler.step(output, t, x, **kwargs).prev_sample
        best = min(best, (time.perf_counter() - start) / len(scheduler.timesteps))
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'scheduler':<34} {'diffusers us':>13} {'diffloom us':>12} {'ratio':>6}")
    for name in NAMES:
        ref = per_step(getattr(diffusers, name)(), args.steps, args.repeat)
        ours = per_step(getattr(diffloom, name)(), args.steps, args.repeat)
        print(f"{name:<34} {ref * 1e6:13.1f} {ours * 1e6:12.1f} {ours / ref:6.2f}")


if __name__ == "__main__":
    main()
