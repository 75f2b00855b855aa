"""diffloom against diffusers on one GPU: seconds per image, first-call latency, peak memory, image difference.

Two models with seeded random weights, built once with diffusers' classes and saved as diffusers pipeline folders
(float16) that both libraries load:

- ``sd15``: Stable Diffusion 1.5's architecture, DPM++ 2M (DPMSolverMultistepScheduler), 512x512, 25 steps.
- ``sdxl``: SDXL base's architecture, Euler, 1024x1024, 30 steps.

Classifier-free guidance on (7.5 and 5.0, each pipeline's default), float16, one prompt per image. The tokenizer is
the shipped model's (77 tokens); the text encoders have the real widths and depths.

A mode is ``library:name``; each is one row per model and batch size:

- ``diffusers:eager``, ``diffloom:eager``: the pipelines as loaded.
- ``diffusers:reduce-overhead``: diffusers' best configuration, the UNet in channels_last and
  ``torch.compile(mode="reduce-overhead", fullgraph=True)``.

A new mode is one more entry in ``MODES``: a function that takes the loaded pipeline and prepares it.

Each mode runs in a fresh process. Per row: the first call's seconds (compilation included; diffloom's fast
path compiles in the background instead, and ``compiled after s`` says when it had finished), the median seconds
per image of ``--repeats`` further calls, the peak GPU memory allocated during the calls (weights included), the
largest absolute difference and PSNR (images in [0, 1]) against the first mode's images for the same model, batch
and seed, and the images' standard deviation and clipped fraction (values exactly 0 or 1), which show when random
weights give images too flat or saturated for the difference to mean much.

    python benchmarks/gpu.py [--models sd15 sdxl] [--batches 1 4] [--modes diffusers:eager diffloom:eager]
                             [--repeats 5] [--json results.json] [--tiny]

``--tiny`` shrinks the models and images to check this script on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from diffloom import hookimpl

SHIPPED_TOKENIZER = Path(__file__).resolve().parent.parent / "plugins/diffloom_faces/shipped/shapes-128/tokenizer"
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
           "a bowl of ramen, studio lighting", "an oil painting of a fox in the snow"]
# Stable Diffusion's training noise schedule, shared by SD 1.5 and SDXL.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1)
RUNS = {"sd15": dict(size=512, steps=25, guidance=7.5), "sdxl": dict(size=1024, steps=30, guidance=5.0)}
TINY_RUNS = {"sd15": dict(size=64, steps=3, guidance=7.5), "sdxl": dict(size=64, steps=3, guidance=5.0)}


def text_config(tokenizer, hidden, layers, heads, act):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, projection_dim=hidden,
                          max_position_embeddings=77, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build(model: str, folder: Path, tiny: bool, device: str) -> float:
    """Save ``model`` with seeded random float16 weights as a diffusers folder; returns seconds taken."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    started = time.perf_counter()
    tokenizer = CLIPTokenizer.from_pretrained(SHIPPED_TOKENIZER, model_max_length=77)
    # SD's VAE is four levels of two ResNet blocks; SDXL's differs only in its latent scaling factor.
    vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=RUNS[model]["size"],
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               scaling_factor=0.18215 if model == "sd15" else 0.13025)
    if model == "sd15":
        text = [(CLIPTextModel, (768, 12, 12, "quick_gelu"))]
        unet = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    else:
        text = [(CLIPTextModel, (768, 12, 12, "quick_gelu")), (CLIPTextModelWithProjection, (1280, 32, 20, "gelu"))]
        unet = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    if tiny:
        text = [(cls, (32, 2, 2, act)) for cls, (_, _, _, act) in text]
        unet.update(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                    cross_attention_dim=32 * len(text))
        if model == "sd15":
            unet.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        else:
            unet.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
        vae.update(block_out_channels=(32,) * 4, layers_per_block=1, sample_size=64)
    torch.manual_seed(0)
    with torch.device(device):  # random init of billions of parameters is much faster on the GPU
        encoders = [cls(text_config(tokenizer, *sizes)).half() for cls, sizes in text]
        unet_model = diffusers.UNet2DConditionModel(**unet).half()
        vae_model = diffusers.AutoencoderKL(**vae).half()
    if model == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae_model, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet_model,
            scheduler=diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae_model, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet_model, add_watermarker=False,
            scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading",
                                                       interpolation_type="linear"))
    pipe.save_pretrained(folder)
    del pipe, encoders, unet_model, vae_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


def load(library: str, model: str, folder: Path, device: str):
    if library == "diffusers":
        import diffusers as lib
    else:
        import diffloom as lib
    cls = lib.StableDiffusionPipeline if model == "sd15" else lib.StableDiffusionXLPipeline
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = cls.from_pretrained(folder, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reduce_overhead(pipe):
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)


def offload(pipe):
    pipe.enable_model_cpu_offload()


MODES = {"diffusers:eager": lambda pipe: None, "diffloom:eager": lambda pipe: None,
         "diffusers:reduce-overhead": reduce_overhead,
         "diffloom:quick": lambda pipe: pipe.enable_fast_path(compile=False),
         "diffloom:fast": lambda pipe: pipe.enable_fast_path(),
         # The same as diffloom:fast, in a process that finds the first one's compiled artefacts on disk.
         "diffloom:fast-cached": lambda pipe: pipe.enable_fast_path(),
         "diffusers:offload": offload, "diffloom:offload": offload,
         # Both libraries eager in one process, their calls alternating: drifts of the machine (clocks, other
         # tenants) hit both alike, so the ratio of the two rows is steadier than across processes.
         "both:eager-interleaved": lambda pipe: None}


class StageTimer:
    """A diffloom hook recording CUDA events at the call's stages: prompt encoding (call start to the first
    step), denoising (first step to the last), decoding (last step to after the VAE)."""

    def __init__(self):
        self.events = {}

    def mark(self, name):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events[name] = event

    def stages_ms(self) -> dict:
        order = ["start", "denoise", "decode", "end"]
        return {f"{a}->{b}": round(self.events[a].elapsed_time(self.events[b]), 2) for a, b in zip(order, order[1:])}

    @hookimpl
    def on_call_start(self, pipe, call):
        self.mark("start")

    @hookimpl
    def on_step_begin(self, pipe, call, step):
        if step.index == 0:
            self.mark("denoise")

    @hookimpl
    def on_step_end(self, pipe, call, step):
        self.mark("decode")

    @hookimpl
    def after_decode(self, pipe, call, images):
        self.mark("end")


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def generate(pipe, batch: int, run: dict, device: str, seed: int = 0, **kwargs) -> tuple[np.ndarray, float]:
    """One pipeline call of ``batch`` images; returns the images (float32 in [0, 1]) and the seconds taken."""
    synchronize(device)
    started = time.perf_counter()
    images = pipe(prompt=[PROMPTS[i % len(PROMPTS)] for i in range(batch)], height=run["size"], width=run["size"],
                  num_inference_steps=run["steps"], guidance_scale=run["guidance"], output_type="np",
                  generator=torch.Generator(device).manual_seed(seed), **kwargs).images
    synchronize(device)
    return np.asarray(images, dtype=np.float32), time.perf_counter() - started


def compare(images: np.ndarray, reference: np.ndarray) -> dict:
    diff = np.abs(images - reference)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"max_abs_diff": float(diff.max()), "psnr_db": math.inf if mse == 0 else 10 * math.log10(1 / mse)}


def measure(model: str, mode: str, folder: Path, batches: list[int], run: dict, repeats: int, device: str,
            out: Path) -> None:
    """One mode, in a process of its own: writes a row per batch to ``out/rows.json`` and the first call's images
    to ``out/batch<N>.npy``."""
    library = mode.split(":")[0]
    if library == "both":
        return measure_interleaved(model, mode, folder, batches, run, repeats, device, out)
    pipe = load(library, model, folder, device)
    MODES[mode](pipe)
    rows = []
    for batch in batches:
        print(f"  {model} {mode} batch {batch} ...", file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        images, first = generate(pipe, batch, run, device)
        # diffloom's fast path compiles in the background; the steady state starts once it has finished.
        compiled = None
        if hasattr(pipe, "wait_for_fast_path") and pipe.wait_for_fast_path():
            compiled = time.perf_counter() - started
        times = [generate(pipe, batch, run, device)[1] for _ in range(repeats)]
        stages = None
        if library == "diffloom" and device == "cuda":
            timer = StageTimer()
            generate(pipe, batch, run, device, hooks=[timer])
            stages = timer.stages_ms()
        rows.append(dict(model=model, mode=mode, batch=batch, size=run["size"], steps=run["steps"],
                         first_call_s=round(first, 3),
                         compiled_after_s=None if compiled is None else round(compiled, 1), s_per_image=round(statistics.median(times) / batch, 4),
                         call_s=[round(t, 4) for t in times], stages_ms=stages,
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None))
        np.save(out / f"batch{batch}.npy", images)
    (out / "rows.json").write_text(json.dumps(rows))


def measure_interleaved(model: str, mode: str, folder: Path, batches: list[int], run: dict, repeats: int,
                        device: str, out: Path) -> None:
    """Both libraries' pipelines in one process, called in turn: a row per library and batch (no peak memory,
    which the two share)."""
    name = mode.split(":")[1]
    pipes = {library: load(library, model, folder, device) for library in ("diffusers", "diffloom")}
    rows = []
    for batch in batches:
        print(f"  {model} {mode} batch {batch} ...", file=sys.stderr, flush=True)
        firsts = {library: generate(pipe, batch, run, device) for library, pipe in pipes.items()}
        times = {library: [] for library in pipes}
        for _ in range(repeats):
            for library, pipe in pipes.items():
                times[library].append(generate(pipe, batch, run, device)[1])
        for library, (images, first) in firsts.items():
            rows.append(dict(model=model, mode=f"{library}:{name}", batch=batch, size=run["size"], steps=run["steps"],
                             first_call_s=round(first, 3), compiled_after_s=None,
                             s_per_image=round(statistics.median(times[library]) / batch, 4),
                             call_s=[round(t, 4) for t in times[library]], stages_ms=None, peak_gib=None,
                             images=f"{library}-batch{batch}.npy"))
            np.save(out / f"{library}-batch{batch}.npy", images)
    (out / "rows.json").write_text(json.dumps(rows))


def bench(model: str, folder: Path, modes: list[str], batches: list[int], repeats: int, tiny: bool, work: Path,
          record) -> None:
    """Each mode in a fresh process, so that every first call pays the same process-wide start-up costs (CUDA
    context, library handles) and none inherits another's warm caches; images are compared here."""
    references = {}  # batch -> (mode, the first mode's images)
    for mode in modes:
        out = work / f"{model}-{mode.replace(':', '-')}"
        out.mkdir()
        command = [sys.executable, __file__, "--worker", model, mode, str(folder), str(out), "--repeats",
                   str(repeats), "--batches", *map(str, batches)] + (["--tiny"] if tiny else [])
        # Compiled artefacts are cached on disk: each mode starts cold, except "-cached" ones, which reuse
        # the cache of the mode they are named after.
        cache = work / f"inductor-{model}-{mode.removesuffix('-cached').replace(':', '-')}"
        result = subprocess.run(command, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
        if result.returncode != 0:
            sys.exit(f"{' '.join(command)} failed (exit code {result.returncode}); its output is above")
        for row in json.loads((out / "rows.json").read_text()):
            images = np.load(out / row.pop("images", f"batch{row['batch']}.npy"))
            reference = references.setdefault(row["batch"], (mode, images))
            # Random weights can give flat or clipped images, whose differences would say little.
            row.update(compare(images, reference[1]), reference=reference[0], nan=bool(np.isnan(images).any()),
                       image_std=round(float(images.std()), 4),
                       clipped=round(float(np.mean((images == 0) | (images == 1))), 4))
            record(row)


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<5} {'mode':<26} {'batch':>5} {'s/image':>8} {'first call s':>12} {'peak GiB':>8} "
             f"{'max |diff|':>10} {'PSNR dB':>8} {'std':>6} {'clipped':>7}  vs"]
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"{r['model']:<5} {r['mode']:<26} {r['batch']:>5} {r['s_per_image']:>8.4f} "
                     f"{r['first_call_s']:>12.2f} {peak:>8} {r['max_abs_diff']:>10.4f} {r['psnr_db']:>8.1f} "
                     f"{r['image_std']:>6.3f} {r['clipped']:>7.3f}  "
                     f"{r['reference']}{'  NaN!' if r['nan'] else ''}"
                     f"{'  stages ms ' + str(r['stages_ms']) if r.get('stages_ms') else ''}"
                     f"{'  compiled after s ' + str(r['compiled_after_s']) if r.get('compiled_after_s') else ''}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(RUNS), default=["sd15", "sdxl"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["diffusers:eager", "diffloom:eager"],
                        help="the first mode is the reference of the image differences")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first (the median counts)")
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after every row)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and images: a CPU check of this script")
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "MODE", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        model, mode, folder, out = args.worker
        run = (TINY_RUNS if args.tiny else RUNS)[model]
        measure(model, mode, Path(folder), args.batches, run, args.repeats, device, Path(out))
        return
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    import diffusers

    import diffloom

    header = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), device=device_name,
                  torch=torch.__version__, diffusers=diffusers.__version__,
                  diffloom=getattr(diffloom, "__version__", "unknown"), command=" ".join(sys.argv),
                  dtype="float16" if device == "cuda" else "float32")
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps({**header, "rows": rows}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            folder = Path(tmp) / model
            print(f"built {model} in {build(model, folder, args.tiny, device):.1f} s", flush=True)
            bench(model, folder, args.modes, args.batches, args.repeats, args.tiny, Path(tmp), record)
            shutil.rmtree(folder)  # free the disk before the next model
    print(table(rows))


if __name__ == "__main__":
    main()
