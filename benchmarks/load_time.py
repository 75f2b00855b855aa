"""Loading a full-size SD 1.5 UNet and VAE: diffloom next to diffusers, on the same folder, in one run.

    python benchmarks/load_time.py [--folder benchmarks/_artifacts/sd15-random] [--dtype float16] [--repeat 3]

The first run saves random weights once in the diffusers format (diffusers builds them; about 1.7 GB in
float16). Each measurement is a fresh process: wall time of `from_pretrained` for the UNet and the VAE, and the
process's peak RSS. Target: diffloom no slower than diffusers and no higher peak RSS.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)

MEASURE = """
import re, sys, time, torch
torch.set_num_threads(2)
lib, folder, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if lib == "diffusers":
    from diffusers import AutoencoderKL, UNet2DConditionModel
else:
    from diffloom import AutoencoderKL, UNet2DConditionModel
start = time.perf_counter()
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
seconds = time.perf_counter() - start
# VmHWM (peak resident set) starts afresh at exec, unlike ru_maxrss, which a child inherits from its parent.
peak_kib = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(seconds, peak_kib / 1024)
"""


def save_random_weights(folder: Path, dtype: str):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    for name, cls, config in (("unet", UNet2DConditionModel, UNET), ("vae", AutoencoderKL, VAE)):
        if not (folder / name / "config.json").exists():
            cls(**config).to(getattr(torch, dtype)).save_pretrained(folder / name)


def measure(lib, folder, dtype, repeat):
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", MEASURE, lib, str(folder), dtype], check=True,
                             capture_output=True, text=True).stdout.split()
        runs.append((float(out[0]), float(out[1])))
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path(__file__).parent / "_artifacts" / "sd15-random")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    save_random_weights(args.folder, args.dtype)
    results = {lib: measure(lib, args.folder, args.dtype, args.repeat) for lib in ("diffusers", "diffloom")}
    print(f"{'library':<10} {'load s (median)':>16} {'peak RSS MiB':>13}")
    for lib, (seconds, rss) in results.items():
        print(f"{lib:<10} {seconds:16.2f} {rss:13.0f}")
    (d_s, d_rss), (o_s, o_rss) = results["diffusers"], results["diffloom"]
    print(f"\ndiffloom / diffusers: load time {o_s / d_s:.2f}x, peak RSS {o_rss / d_rss:.2f}x (targets <= 1.00)")
    print(json.dumps({"diffusers": results["diffusers"], "diffloom": results["diffloom"]}))


if __name__ == "__main__":
    main()
