"""`diffloom batch` on GPUs: images per second per engine and GPU count, scaling efficiency, byte-identity.

Two models:

- ``sd15-random``: Stable Diffusion 1.5's architecture (UNet 320/640/1280/1280, VAE 128/256/512/512, CLIP text
  encoder of width 768, 12 layers, 77 positions) with seeded random weights in float16, built once with
  diffloom's own classes and saved as a pipeline folder; the tokenizer is the shipped model's, set to 77 tokens.
  Its scheduler is PNDM with SD 1.5's training schedule.
- ``shapes-128``: the shipped model, at its own size.

Each run is the real command in a fresh process on a fresh output folder: ``--engine local``, then
``--engine torchrun --workers N`` for every GPU count N this machine has (of 1, 2, 4, 8), then ``--engine ray
--workers N`` where Ray is installed. Reported per run: the generation rate (the command's own last progress line,
timed from when every pipeline is loaded), the wall time of the whole command, the scaling efficiency (rate with N
GPUs / (N x the same engine's 1-GPU rate)), and whether every PNG is byte-identical (sha256) to the local run's.
Runs that this machine cannot make (more GPUs than it has, Ray missing) are listed as missing.

    python benchmarks/batch_gpu.py [--gpus 1 2 4 8] [--json results.json] [--tiny]

``--tiny`` shrinks both models' jobs (and the SD 1.5 model itself) to check this script on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parent.parent / "plugins" / "diffloom_faces" / "shipped" / "shapes-128"
GPU_COUNTS = (1, 2, 4, 8)
# Never let NCCL or PyTorch use NVLink multicast on shared machines (see the device notes); workers inherit these.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SD_PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
              "a bowl of ramen, studio lighting", "an oil painting of a fox in the snow"]
SHAPE_PROMPTS = [f"a {colour} {shape} on a {background} background" for colour, shape, background in
                 [("red", "circle", "white"), ("blue", "square", "black"), ("green", "triangle", "gray"),
                  ("yellow", "circle", "black"), ("purple", "square", "white")]]


def build_sd15(folder: Path, tiny: bool, device: str, dtype: torch.dtype) -> float:
    """Save an SD 1.5-architecture pipeline with seeded random weights in ``dtype``; returns seconds taken."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffloom import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    started = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer", model_max_length=77)
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768)
    # SD 1.5's UNet and VAE are these classes' default block layouts; only the sizes below differ from them.
    unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    if tiny:
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
        unet.update(sample_size=8, cross_attention_dim=32, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        vae.update(block_out_channels=(32,) * 4, layers_per_block=1, sample_size=64)
    torch.manual_seed(0)
    with torch.device(device):  # random init of ~1B parameters is much faster on the GPU
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **text))
        unet_model = UNet2DConditionModel(**unet)
        vae_model = AutoencoderKL(**vae)
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae_model.to(dtype), text_encoder=text_encoder.to(dtype), tokenizer=tokenizer,
                                   unet=unet_model.to(dtype), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    del pipe, text_encoder, unet_model, vae_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def run_job(model: Path, prompts: Path, out: Path, engine: str, workers: int | None, steps: int, size: int,
            dtype: str) -> dict:
    command = [sys.executable, "-m", "diffloom", "batch", str(prompts), "--out", str(out), "--model", str(model),
               "--steps", str(steps), "--size", str(size), "--dtype", dtype, "--engine", engine]
    if workers is not None:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **NO_MULTICAST})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit code {result.returncode}):\n{result.stderr[-4000:]}")
    rates = re.findall(r"([\d.]+) images/s", result.stderr)
    if not rates:
        sys.exit(f"{' '.join(command)} printed no progress line:\n{result.stderr[-4000:]}")
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {"engine": engine, "gpus": workers or 1, "images_per_s": float(rates[-1]), "wall_s": round(wall, 2),
            "image_s_mean": round(sum(r["timing"]["seconds"] for r in rows) / len(rows), 4),
            "images": len(hashes),
            "set_sha256": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(), "hashes": hashes}


def bench_model(name: str, model: Path, prompts: list[str], items: int, steps: int, size: int, dtype: str,
                gpus: list[int], ray: bool, work: Path) -> list[dict]:
    jsonl = work / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": prompts[i % len(prompts)]}) + "\n" for i in range(items)))
    plan = [("local", None)] + [("torchrun", n) for n in gpus] + ([("ray", n) for n in gpus] if ray else [])
    runs = []
    for engine, workers in plan:
        print(f"  {name}: {engine} {workers or 1} ...", file=sys.stderr, flush=True)
        run = run_job(model, jsonl, work / f"{name}-{engine}-{workers or 1}", engine, workers, steps, size, dtype)
        run.update(model=name, items=items, steps=steps, size=size, dtype=dtype)
        runs.append(run)
    reference = runs[0]
    for run in runs:
        base = next(r for r in runs if r["engine"] == run["engine"] and r["gpus"] == 1)
        run["efficiency"] = round(run["images_per_s"] / (run["gpus"] * base["images_per_s"]), 3)
        run["identical_to_local"] = run["hashes"] == reference["hashes"]
        if run is not reference:
            del run["hashes"]  # the local run's hashes stand for every run identical to it
    return runs


def table(runs: list[dict]) -> str:
    lines = [f"{'model':<12} {'engine':<9} {'GPUs':>4} {'images':>6} {'images/s':>9} {'efficiency':>10} "
             f"{'s/image':>8} {'wall s':>7}  same PNG bytes as local"]
    for r in runs:
        lines.append(f"{r['model']:<12} {r['engine']:<9} {r['gpus']:>4} {r['images']:>6} "
                     f"{r['images_per_s']:>9.2f} {r['efficiency']:>10.3f} {r['image_s_mean']:>8.3f} "
                     f"{r['wall_s']:>7.1f}  {r['identical_to_local']}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+",
                        help="worker counts for torchrun and ray (default: each of 1, 2, 4, 8 this machine has; "
                             "on a machine without a GPU, 1 CPU worker)")
    parser.add_argument("--sd-items", type=int, default=16)
    parser.add_argument("--shipped-items", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="tiny models and jobs: a CPU check of this script")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    available = torch.cuda.device_count()
    gpus = args.gpus or ([n for n in GPU_COUNTS if n <= available] if cuda else [1])
    dtype = "float16" if cuda else "float32"
    ray = importlib.util.find_spec("ray") is not None
    missing = [{"engine": "torchrun", "gpus": n, "why": f"this machine has {available} GPU(s)"}
               for n in GPU_COUNTS if n > available]
    if ray:
        missing += [{"engine": "ray", "gpus": n, "why": f"this machine has {available} GPU(s)"}
                    for n in GPU_COUNTS if n > available]
    else:
        missing += [{"engine": "ray", "gpus": n, "why": "ray is not installed here"} for n in GPU_COUNTS]
    if args.tiny:
        sd = dict(items=4, steps=2, size=64)
        shipped = dict(items=4, steps=2, size=32)
    else:
        sd = dict(items=args.sd_items, steps=25, size=512)
        shipped = dict(items=args.shipped_items, steps=20, size=128)

    device_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    print(f"{device_name} x{available}; torch {torch.__version__}; {dtype}; worker counts {gpus}; "
          f"ray {'installed' if ray else 'not installed'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_s = build_sd15(work / "sd15-random", args.tiny, "cuda" if cuda else "cpu", getattr(torch, dtype))
        print(f"built sd15-random in {build_s:.1f} s", flush=True)
        runs = bench_model("sd15-random", work / "sd15-random", SD_PROMPTS, dtype=dtype, gpus=gpus, ray=ray,
                           work=work, **sd)
        runs += bench_model("shapes-128", SHIPPED, SHAPE_PROMPTS, dtype=dtype, gpus=gpus, ray=ray, work=work,
                            **shipped)

    print(f"\n{sd['items']} SD 1.5 images at {sd['size']}x{sd['size']}, {sd['steps']} steps; "
          f"{shipped['items']} shapes-128 images at {shipped['size']}x{shipped['size']}, {shipped['steps']} steps; "
          f"{dtype}, guidance per model default; efficiency = rate / (GPUs x the engine's 1-GPU rate)")
    print(table(runs))
    for m in missing:
        print(f"missing: {m['engine']} on {m['gpus']} GPU(s): {m['why']}")
    eight = [r for r in runs if r["model"] == "sd15-random" and r["gpus"] == 8]
    for r in eight:
        print(f"target (efficiency >= 0.9 at 8 GPUs, SD 1.5, {r['engine']}): {r['efficiency']:.3f} "
              f"{'met' if r['efficiency'] >= 0.9 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name,
            "gpus_on_machine": available, "torch": torch.__version__, "command": sys.argv,
            "sd15_build_s": round(build_s, 1),
            "runs": runs, "missing": missing}, indent=1))


if __name__ == "__main__":
    main()
