"""Train diffloom's built-in text-to-image model, "shapes-128", from nothing but the procedural shapes world.

The result is a complete Stable Diffusion pipeline folder in the diffusers layout (model_index.json, tokenizer,
text_encoder, unet, vae, scheduler), written by diffloom's own ``save_pretrained``:

* tokenizer: a real ``transformers.CLIPTokenizer`` over our own byte-level BPE vocabulary (shapes/tokenizer.py),
  16 tokens long;
* text encoder: a 3-layer, 128-wide ``transformers.CLIPTextModel``, trained together with the UNet;
* VAE: diffloom's ``AutoencoderKL``, 4 latent channels, 128x128 pixels -> 16x16 latents;
* UNet: diffloom's ``UNet2DConditionModel`` on 16x16 latents, cross-attending to the text at every level;
* scheduler: trained with SD's DDPM schedule (1000 steps, scaled-linear betas 0.00085..0.012, epsilon
  prediction); the folder ships a DPM-Solver++ (2M) config of that schedule as the default sampler.

Two stages, each sized to finish in minutes on one GPU (bf16 autocast) or overnight on a CPU:

  stage 1 ``vae``:  the autoencoder on random shape images; loss L1 + L2 + a small KL term (no perceptual or
                    adversarial loss: flat shapes need none). Afterwards the latent scaling factor is measured
                    (1 / std of the latents), as SD's was.
  stage 2 ``unet``: the UNet and the text encoder on latents of random images (encoded once by the frozen
                    VAE into a pool on the device), with the prompt replaced by "" 10% of the time so that
                    classifier-free guidance works; offset noise teaches the model to take the background's
                    brightness from the prompt rather than from the starting noise. The saved weights are an
                    exponential moving average of the trained ones.

Usage (from the repository root; shapes-128 as shipped came from ``--steps 3867`` and ``--steps 3250``):

  python training/train_shapes.py vae     --out runs/shapes        # writes runs/shapes/vae
  python training/train_shapes.py unet    --out runs/shapes        # reads it, writes runs/shapes/pipeline
  python training/train_shapes.py samples --out runs/shapes        # a grid of its images, samples.png
  python training/train_shapes.py all     --out runs/shapes        # the three in turn
  python training/train_shapes.py all --out /tmp/smoke --steps 3 --batch-size 4 --pool-size 16   # CPU smoke test

``--steps auto`` (the default) times the first steps and then fixes the step count that fits ``--minutes``; the
count used is written to the stage's log (``train_log_STAGE.json``), and passing it as ``--steps`` repeats the run.
Everything is seeded: the data, the initialisation and the noise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from shapes import IMAGE_SIZE, MODEL_MAX_LENGTH, build_tokenizer, sample_batch
from shapes.tokenizer import write_vocabulary

# -- the architecture -----------------------------------------------------------------------------------------

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32,
)
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
TEXT_HIDDEN = 128
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128), norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4,  # SD's name for the number of heads
)
TRAIN_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, steps_offset=1)
# How the finished model samples best (written next to it for `diffloom generate`).
SAMPLING_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 2.0}

CFG_DROPOUT = 0.1  # share of prompts replaced by "" in stage 2
OFFSET_NOISE = 0.1  # std of the per-channel constant added to the training noise
KL_WEIGHT = 1e-6
EMA_DECAY = 0.999


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
                          projection_dim=TEXT_HIDDEN, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


# -- training machinery -----------------------------------------------------------------------------------------


class StepPlan:
    """How many optimiser steps a stage takes: a fixed number, or as many as fit in ``minutes`` (measured on the
    first ``probe`` steps, then fixed, so the learning-rate schedule knows its end)."""

    def __init__(self, steps: str, minutes: float, probe: int = 30):
        self.fixed = None if steps == "auto" else int(steps)
        self.minutes = minutes
        self.probe = probe
        self.total = self.fixed
        self._start = None

    def tick(self, step: int):
        """Call before step ``step`` (0-based)."""
        if self.total is not None:
            return
        if step == 3:  # the first steps include compilation and allocator warm-up; time from here
            _synchronize()
            self._start = time.perf_counter()
        elif step == 3 + self.probe:
            _synchronize()  # the GPU may still be working through queued steps
            per_step = (time.perf_counter() - self._start) / self.probe
            self.total = max(step + 1, int(self.minutes * 60 / per_step))
            print(f"{per_step * 1000:.1f} ms a step: training {self.total} steps to fit {self.minutes} minutes",
                  flush=True)

    def done(self, step: int) -> bool:
        return self.total is not None and step >= self.total

    def lr_factor(self, step: int, warmup: int) -> float:
        """Linear warm-up, then a cosine decay to 5% by the last step (constant until the count is known)."""
        if step < warmup:
            return (step + 1) / warmup
        if self.total is None:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def seeded_generators(seed: int, device: torch.device):
    """(data generator on the CPU, noise generator on ``device``)."""
    return torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed + 1)


def write_log(out: Path, stage: str, record: dict):
    path = out / f"train_log_{stage}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


# -- stage 1: the autoencoder -------------------------------------------------------------------------------------


def train_vae(args, device: torch.device):
    from diffloom import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    data_gen, noise_gen = seeded_generators(args.seed, device)
    plan = StepPlan(args.steps, args.minutes)
    started, step, history = time.perf_counter(), 0, []
    vae.train()
    while not plan.done(step):
        plan.tick(step)
        for group in optimiser.param_groups:
            group["lr"] = args.vae_lr * plan.lr_factor(step, warmup=100)
        images, _ = sample_batch(args.batch_size, data_gen, device)
        with autocast(device):
            moments = vae.encode(images).latent_dist
            posterior = type(moments)(moments.parameters.float())  # the KL sum wants fp32
            recon = vae.decode(posterior.sample(noise_gen)).sample.float()
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = rec + KL_WEIGHT * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        if step % args.log_every == 0 or plan.done(step + 1):
            history.append({"step": step, "rec": rec.item(), "kl": kl.item(),
                            "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(history[-1]), flush=True)
        step += 1

    vae.eval()
    stats = latent_statistics(vae, data_gen, noise_gen, device, args.batch_size)
    vae.register_to_config(scaling_factor=stats["scaling_factor"])
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.out / "vae")
    save_reconstructions(vae, args.out / "vae_reconstructions.png", device)
    write_log(args.out, "vae", {"steps": step, "batch_size": args.batch_size, "seed": args.seed,
                                "seconds": round(time.perf_counter() - started, 1), "device": str(device),
                                "latents": stats, "history": history})


@torch.no_grad()
def latent_statistics(vae, data_gen, noise_gen, device, batch_size, batches: int = 8) -> dict:
    """Per-channel mean and std of the latents of random images, the overall std, and the reconstruction error;
    the scaling factor that gives the diffusion model unit-variance latents is 1 / std."""
    latents, errors = [], []
    for _ in range(batches):
        images, _ = sample_batch(batch_size, data_gen, device)
        with autocast(device):
            z = vae.encode(images).latent_dist.sample(noise_gen).float()
            recon = vae.decode(z).sample.float()
        latents.append(z)
        errors.append((recon.clamp(-1, 1) - images).abs().mean().item())
    z = torch.cat(latents)
    return {"scaling_factor": round(1.0 / z.std().item(), 5), "std": z.std().item(),
            "channel_mean": z.mean(dim=(0, 2, 3)).tolist(), "channel_std": z.std(dim=(0, 2, 3)).tolist(),
            "reconstruction_l1": sum(errors) / len(errors)}


@torch.no_grad()
def save_reconstructions(vae, path: Path, device, n: int = 8):
    """A picture to eyeball: n fresh images (top row) over their reconstructions (bottom row)."""
    from diffloom import make_image_grid
    from diffloom.images import numpy_to_pil, pt_to_numpy

    images, _ = sample_batch(n, torch.Generator().manual_seed(3), device)
    with autocast(device):
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.float()
    both = (torch.cat([images, recon]).clamp(-1, 1) + 1) / 2
    make_image_grid(numpy_to_pil(pt_to_numpy(both.cpu())), rows=2, cols=n).save(path)
    print(f"wrote {path}", flush=True)


# -- stage 2: the UNet and the text encoder -----------------------------------------------------------------------


class LatentPool:
    """A pool of training examples held on the device: latents of random images (encoded once by the frozen
    VAE, times the scaling factor) and, for each, the index of its prompt in a table of token ids.

    Encoding every batch afresh would cost more than the UNet's own step; a pool of a quarter million images
    covers the grammar densely, and fresh noise and timesteps make every visit a new example.
    """

    def __init__(self, vae, tokenizer, size: int, data_gen, noise_gen, device, chunk: int = 1024):
        prompts_seen: dict[str, int] = {"": 0}  # index 0: the empty prompt, for guidance dropout
        latents, prompt_index = [], []
        scaling = vae.config.scaling_factor
        with torch.no_grad():
            for start in range(0, size, chunk):
                images, prompts = sample_batch(min(chunk, size - start), data_gen, device)
                with autocast(device):
                    z = vae.encode(images).latent_dist.sample(noise_gen).float() * scaling
                latents.append(z.half())
                prompt_index += [prompts_seen.setdefault(p, len(prompts_seen)) for p in prompts]
        self.latents = torch.cat(latents)
        self.prompt_index = torch.tensor(prompt_index, device=device)
        self.token_ids = tokenizer(list(prompts_seen), padding="max_length", max_length=tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids.to(device)

    def batch(self, n: int, generator: torch.Generator, drop_prompt: float):
        """(latents, token ids) of ``n`` random pool entries; each prompt becomes "" with chance ``drop_prompt``."""
        pick = torch.randint(len(self.latents), (n,), generator=generator, device=self.latents.device)
        index = self.prompt_index[pick]
        dropped = torch.rand(n, generator=generator, device=index.device) < drop_prompt
        return self.latents[pick].float(), self.token_ids[torch.where(dropped, 0, index)]


def train_unet(args, device: torch.device):
    from transformers import CLIPTextModel

    from diffloom import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    vae_folder = args.out / "vae"
    if not (vae_folder / "config.json").is_file():
        raise SystemExit(f"{vae_folder} holds no trained VAE; run stage 1 first "
                         f"(python training/train_shapes.py vae --out {args.out})")
    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=torch.float32).to(device).eval().requires_grad_(False)
    tokenizer = build_tokenizer(args.out / "tokenizer")
    data_gen, noise_gen = seeded_generators(args.seed, device)
    pool = LatentPool(vae, tokenizer, args.pool_size, data_gen, noise_gen, device)
    print(f"encoded a pool of {len(pool.latents)} latents in {time.perf_counter() - started:.1f} s", flush=True)

    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel(text_encoder_config(tokenizer)).to(device).train()
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device).train()
    # Compiling fuses the many small kernels of these small models; the step is otherwise bound by launches.
    run_text_encoder = torch.compile(text_encoder) if args.compile else text_encoder
    run_unet = torch.compile(unet) if args.compile else unet
    scheduler = DDPMScheduler(**TRAIN_SCHEDULE)
    # The forward process q(x_t | x_0) with the schedule's table moved to the device once: copying it every step
    # (as add_noise does) would make the host wait for the GPU each time.
    alpha_bar = scheduler.alphas_cumprod.to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    optimiser = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01, fused=device.type == "cuda")
    plan = StepPlan(args.steps, args.minutes)
    started, step, history = time.perf_counter(), 0, []
    while not plan.done(step):
        plan.tick(step)
        for group in optimiser.param_groups:
            group["lr"] = args.unet_lr * plan.lr_factor(step, warmup=500)
        latents, token_ids = pool.batch(args.batch_size, noise_gen, CFG_DROPOUT)
        batch, channels = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=noise_gen, device=device)
        noise = noise + OFFSET_NOISE * torch.randn((batch, channels, 1, 1), generator=noise_gen, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=noise_gen, device=device)
        a = alpha_bar[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast(device):
            context = run_text_encoder(token_ids)[0]
            pred = run_unet(noisy, t, encoder_hidden_states=context).sample.float()
        loss = F.mse_loss(pred, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        with torch.no_grad():
            # A short average at first (the early weights are poor), EMA_DECAY once training is under way.
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        if step % args.log_every == 0 or plan.done(step + 1):
            history.append({"step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(history[-1]), flush=True)
        step += 1

    with torch.no_grad():
        for p, average in zip(params, ema):
            p.copy_(average)
    save_pipeline(args.out / "pipeline", vae, text_encoder, tokenizer, unet, scheduler)
    write_log(args.out, "unet", {"steps": step, "batch_size": args.batch_size, "seed": args.seed,
                                 "pool_size": args.pool_size, "compile": args.compile,
                                 "seconds": round(time.perf_counter() - started, 1), "device": str(device),
                                 "history": history})


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, train_scheduler):
    """Write the pipeline folder: fp16 weights (the models run in fp32 or fp16 alike; half the bytes)."""
    from diffloom import DPMSolverMultistepScheduler, StableDiffusionPipeline

    # "trailing" spacing starts sampling at the last training timestep, where the noise is purest.
    sampler = DPMSolverMultistepScheduler.from_config(train_scheduler.config, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sampler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu", torch.float16)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder)
    # The tokenizer folder gets the plain BPE files that every transformers version reads (a fast tokenizer
    # saves only its tokenizer.json, which older slow CLIPTokenizers cannot load).
    shutil.rmtree(folder / "tokenizer")
    write_vocabulary(folder / "tokenizer", tokenizer.model_max_length)
    (folder / "diffloom_defaults.json").write_text(json.dumps(SAMPLING_DEFAULTS, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20
    print(f"wrote {folder} ({size:.1f} MiB)", flush=True)


@torch.no_grad()
def save_samples(folder: Path, path: Path, device):
    """A picture to eyeball: one sample of every colour and shape from the saved folder at the default settings,
    backgrounds taken in turn (rows: colours, columns: shapes)."""
    from diffloom import DiffusionPipeline, make_image_grid
    from shapes import BACKGROUNDS, COLOURS, SHAPES, prompt_for

    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    backgrounds = list(BACKGROUNDS)
    prompts = [prompt_for(c, s, backgrounds[(i + j) % len(backgrounds)])
               for i, c in enumerate(COLOURS) for j, s in enumerate(SHAPES)]
    images = pipe(prompts, **SAMPLING_DEFAULTS, generator=torch.Generator(device).manual_seed(0)).images
    make_image_grid(images, rows=len(COLOURS), cols=len(SHAPES)).save(path)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "unet", "samples", "all"],
                        help="samples: a grid of the finished pipeline's images, for the eye")
    parser.add_argument("--out", type=Path, required=True, help="run folder: vae/, tokenizer/, pipeline/, logs")
    parser.add_argument("--steps", default="auto", help="optimiser steps per stage, or 'auto' to fit --minutes")
    parser.add_argument("--minutes", type=float, default=7.0, help="time per stage when --steps is auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (vae), 1024 (unet)")
    parser.add_argument("--pool-size", type=int, default=2 ** 18, help="images encoded once for stage 2")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the text encoder")
    parser.add_argument("--vae-lr", type=float, default=4e-4)
    parser.add_argument("--unet-lr", type=float, default=8e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    batch_size = args.batch_size
    if args.stage in ("vae", "all"):
        args.batch_size = batch_size or 64
        train_vae(args, device)
    if args.stage in ("unet", "all"):
        args.batch_size = batch_size or 1024
        train_unet(args, device)
    if args.stage in ("samples", "all"):
        save_samples(args.out / "pipeline", args.out / "samples.png", device)


if __name__ == "__main__":
    main()
