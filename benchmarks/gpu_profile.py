"""Where one denoiser step of SD 1.5 (or SDXL) spends its GPU time, and what each change to it buys.

Every row times the UNet forward (batch 2: classifier-free guidance) replayed from a CUDA graph, so host
overhead is out of the picture: milliseconds per forward, median of 20 replays, after the variant's own
warm-up (compilation included, shown as set-up seconds). Then the 15 CUDA kernels that take most of an eager
forward's time, from torch.profiler.

    python benchmarks/gpu_profile.py [--model sd15|sdxl] [--variants eager channels_last ...]

Random weights in the real architecture, built as in ``benchmarks/gpu.py``. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpu


def graphed_ms(fn, context=nullcontext, replays: int = 20) -> tuple[float, float]:
    """(set-up seconds, median ms per replay) of ``fn`` captured in a CUDA graph under ``context()``."""
    started = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with context(), torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with context(), torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    setup = time.perf_counter() - started
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return setup, statistics.median(times)


def compile_blocks(unet):
    """Regional compilation: each ResNet and transformer block compiled on its own (repeats share code)."""
    for module in unet.modules():
        if type(module).__name__ in ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D"):
            module.compile(options={"conv_1x1_as_mm": True})


# Inductor options per compiled variant: what the fast path uses, and candidate additions to it.
COMPILED = {"compiled": {"conv_1x1_as_mm": True},
            "compiled-cudnn-benchmark": {"conv_1x1_as_mm": True},  # plus torch.backends.cudnn.benchmark
            "compiled-coordinate-descent": {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--variants", nargs="+", default=["eager", "channels_last", "flash", "efficient", "cudnn",
                                                          "regional", "compiled"],
                        choices=["eager", "channels_last", "flash", "efficient", "cudnn", "regional", *COMPILED])
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    run = gpu.RUNS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / args.model
        gpu.build(args.model, folder, tiny=False, device="cuda")
        pipe = gpu.load("diffloom", args.model, folder, "cuda")
    unet = pipe.unet
    latent = run["size"] // 8
    x = torch.randn(2, 4, latent, latent, device="cuda", dtype=torch.float16)
    t = torch.tensor(500, device="cuda")
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda", dtype=torch.float16)
    extra = {}
    if args.model == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
                                      "time_ids": torch.randn(2, 6, device="cuda", dtype=torch.float16)}

    def forward():
        return unet(x, t, encoder_hidden_states=context, **extra, return_dict=False)[0]

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION}
    rows = []
    with torch.no_grad():
        for variant in args.variants:
            if variant != "eager":
                unet.to(memory_format=torch.channels_last)
            context_of = (lambda b=backends[variant]: sdpa_kernel([b])) if variant in backends else nullcontext
            if variant == "regional":
                compile_blocks(unet)
            elif variant in COMPILED:
                for module in unet.modules():
                    module._compiled_call_impl = None
                torch._dynamo.reset()
                torch.backends.cudnn.benchmark = variant == "compiled-cudnn-benchmark"
                unet.compile(options=COMPILED[variant])
            try:
                setup, ms = graphed_ms(forward, context_of)
                rows.append((variant, setup, ms))
            except Exception as e:  # a backend that refuses these shapes is a result too
                rows.append((variant, float("nan"), f"failed: {type(e).__name__}: {str(e)[:80]}"))
            print(rows[-1], flush=True)
        for module in unet.modules():
            module._compiled_call_impl = None
        unet.to(memory_format=torch.channels_last)
        forward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
    print(f"\n{args.model} UNet forward, batch 2, {latent}x{latent} latents, float16, "
          f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'variant':<14} {'set-up s':>9} {'ms/forward':>11}")
    for variant, setup, ms in rows:
        print(f"{variant:<14} {setup:>9.1f} {ms if isinstance(ms, str) else f'{ms:>11.2f}'}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
