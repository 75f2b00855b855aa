"""Marigold: monocular depth from a Stable Diffusion UNet fine-tuned to denoise depth (Ke et al., CVPR 2024).

The image is encoded by the VAE once; an ensemble of depth latents starts from noise and is denoised by the
UNet, which sees ``[image latent, depth latent]`` (8 channels) and the embedding of the empty prompt. The VAE
decodes each depth latent to a 3-channel image whose channel mean is the (affine-invariant) depth. Members are
aligned to each other by a per-member scale and shift, then merged by the median (or mean); their spread is the
uncertainty. Depth comes back in [0, 1] (0 near, 1 far), optionally coloured with a colour map.

Works with the Marigold checkpoints' layout (unet, vae, scheduler, text_encoder, tokenizer), with the DDIM
scheduler (about 10 steps) or the LCM one (1 to 4 steps).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from tqdm.auto import tqdm

from diffloom import DiffusionPipeline, randn_tensor
from diffloom.loop import current_call
from diffloom.outputs import BaseOutput
from diffloom_pipelines.stable_diffusion import step_kwargs_for

logger = logging.getLogger(__name__)

RESAMPLE = {"bilinear": PIL.Image.BILINEAR, "bicubic": PIL.Image.BICUBIC, "nearest": PIL.Image.NEAREST}

# Colour maps as (position, RGB) control points; colours are read from a 256-entry table between them, as
# matplotlib does. Spectral is ColorBrewer's 11-class scheme, viridis sampled at ninths of its range.
_COLOR_MAPS = {
    "Spectral": ["#9e0142", "#d53e4f", "#f46d43", "#fdae61", "#fee08b", "#ffffbf", "#e6f598", "#abdda4", "#66c2a5",
                 "#3288bd", "#5e4fa2"],
    "viridis": ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21908c", "#27ad81", "#5dc863", "#aadc32", "#fde725"],
    "binary": ["#ffffff", "#000000"],
    "gray": ["#000000", "#ffffff"],
}


@dataclass
class MarigoldDepthOutput(BaseOutput):
    """``depth_np``: (H, W) float32 in [0, 1]; ``depth_colored``: PIL image or None (``color_map=None``);
    ``uncertainty``: (H, W) spread of the ensemble in the same units, or None for a single member."""

    depth_np: Any = None
    depth_colored: Any = None
    uncertainty: Any = None


class MarigoldPipeline(DiffusionPipeline):
    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def __call__(self, input_image: PIL.Image.Image, denoising_steps: int = 10, ensemble_size: int = 10,
                 processing_res: int = 768, match_input_res: bool = True, resample_method: str = "bilinear",
                 batch_size: int = 0, seed: int | None = None, color_map: str | None = "Spectral",
                 show_progress_bar: bool = True, ensemble_kwargs: dict | None = None, hooks=()):
        """Predict the depth of ``input_image`` (PIL).

        ``processing_res``: the longer side the image is resized to before inference (0 keeps its size);
        ``match_input_res``: resize the depth back to the input's size. ``batch_size``: members run through
        the UNet at once (0 picks it from free memory). ``ensemble_kwargs``: ``reduction`` ("median" or
        "mean"), ``regularizer_strength``, ``max_iter``, ``tol``, ``max_res`` of :func:`ensemble_depths`.
        """
        self._check_arguments(input_image, denoising_steps, ensemble_size, processing_res, resample_method,
                              batch_size, color_map)
        resample = RESAMPLE[resample_method]
        input_size = input_image.size
        image = input_image.convert("RGB")
        if processing_res > 0:
            image = resize_max_res(image, processing_res, resample)
        rgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        rgb = rgb.to(device=self.device, dtype=self.dtype)
        height, width = rgb.shape[1:]
        chunk = batch_size or self._auto_batch_size(ensemble_size, height, width)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        with self.start_call(hooks=hooks, batch_size=chunk, show_progress_bar=show_progress_bar,
                             extra_step_kwargs=step_kwargs_for(self.scheduler, generator, 0.0)) as call:
            call.hook.on_call_start(pipe=self, call=call)
            # The VAE wants sides divisible by its scale factor: pad by repeating the edge, crop after decoding.
            factor = self.vae_scale_factor
            padded = F.pad(rgb[None], (0, -width % factor, 0, -height % factor), mode="replicate")
            image_latent = self.vae.encode(padded).latent_dist.mean * self.vae.config.scaling_factor
            call.tensors["image_latents"] = image_latent.expand(ensemble_size, -1, -1, -1)
            call.tensors["empty_text_embeds"] = self._empty_text_embedding().expand(ensemble_size, -1, -1)
            # All members' noise is drawn at once, so results do not depend on batch_size.
            latents = randn_tensor((ensemble_size, *image_latent.shape[1:]), generator=generator,
                                   device=self.device, dtype=self.dtype)
            self.scheduler.set_timesteps(denoising_steps, device=self.device)
            latents = self.denoise(call, latents * self.scheduler.init_noise_sigma, self.scheduler.timesteps)

            decoded = torch.cat([self.vae.decode(part / self.vae.config.scaling_factor).sample
                                 for part in latents.split(chunk)])
            decoded = call.fire_after_decode(decoded)
            # The depth VAE output is 3 identical-ish channels in [-1, 1]: average them and map to [0, 1].
            depths = (decoded.mean(dim=1).clamp(-1.0, 1.0) + 1.0) / 2.0
            depths = depths[:, :height, :width].float()

            if ensemble_size > 1:
                depth, uncertainty = ensemble_depths(depths, **(ensemble_kwargs or {}))
            else:
                depth, uncertainty = depths[0], None
            depth = normalize_range(depth)[0]

            depth = depth.cpu().numpy()
            uncertainty = uncertainty.cpu().numpy() if uncertainty is not None else None
            if match_input_res and depth.shape[::-1] != input_size:
                depth = _resize_float(depth, input_size, resample)
                uncertainty = _resize_float(uncertainty, input_size, resample) if uncertainty is not None else None
            depth = depth.clip(0.0, 1.0)
            colored = colorize_depth(depth, color_map) if color_map is not None else None
            output = MarigoldDepthOutput(depth_np=depth, depth_colored=colored, uncertainty=uncertainty)
            call.hook.on_call_end(pipe=self, call=call, output=output)
            return output

    # -- the denoising steps -----------------------------------------------------------------------------------

    def prepare_model_input(self, call, step):
        depth_latents = self.scheduler.scale_model_input(step.latents, step.timestep)
        # Image latent first: the order the UNet was fine-tuned with.
        step.model_input = torch.cat([call.tensors["image_latents"], depth_latents], dim=1)
        step.model_timestep = step.timestep
        step.conditioning = {"encoder_hidden_states": call.tensors["empty_text_embeds"]}

    def run_denoiser(self, call, step):
        # Members go through the UNet batch_size at a time; the scheduler then steps them all together.
        chunk = call.settings["batch_size"]
        states = step.conditioning["encoder_hidden_states"].split(chunk)
        outputs = [self.unet(part, step.model_timestep, encoder_hidden_states=state).sample
                   for part, state in zip(step.model_input.split(chunk), states)]
        return torch.cat(outputs)

    def progress_bar(self, iterable=None, total=None):
        call = current_call()
        if call is not None and call.pipe is self and not call.settings["show_progress_bar"]:
            return tqdm(iterable, total=total, disable=True)
        return super().progress_bar(iterable, total)

    # -- pieces ------------------------------------------------------------------------------------------------

    def _empty_text_embedding(self) -> torch.Tensor:
        ids = self.tokenizer("", padding="do_not_pad", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(device=self.device, dtype=self.dtype)

    def _auto_batch_size(self, ensemble_size: int, height: int, width: int) -> int:
        """Members per UNet batch when the caller leaves it to us: all of them off CUDA; on CUDA as many as
        free memory holds, at about 3 GB per 768x768 member in float32 (Marigold's measured batch sizes), in
        batches of equal size."""
        if self.device.type != "cuda":
            return ensemble_size
        free, _ = torch.cuda.mem_get_info(self.device)
        per_member = 3e9 * (height * width) / 768**2 * torch.finfo(self.dtype).bits / 32
        fits = max(1, min(ensemble_size, int(free // per_member)))
        return math.ceil(ensemble_size / math.ceil(ensemble_size / fits))

    def _check_arguments(self, image, steps, ensemble_size, processing_res, resample_method, batch_size,
                         color_map):
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"input_image must be a PIL image, got {type(image).__name__}; load files with "
                            f"diffloom.load_image")
        for name, value, low in (("denoising_steps", steps, 1), ("ensemble_size", ensemble_size, 1),
                                 ("processing_res", processing_res, 0), ("batch_size", batch_size, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if resample_method not in RESAMPLE:
            raise ValueError(f"resample_method={resample_method!r} is not one of {', '.join(RESAMPLE)}")
        if color_map is not None:
            color_map_table(color_map)
        latent_channels = self.vae.config.latent_channels
        if self.unet.config.in_channels != 2 * latent_channels:
            raise ValueError(f"a Marigold UNet takes the image and the depth latents stacked ({2 * latent_channels}"
                             f" channels), but this unet has in_channels={self.unet.config.in_channels}")
        kind = type(self.scheduler).__name__
        if kind == "DDIMScheduler":
            if steps < 10:
                logger.warning("denoising_steps=%d is few for DDIM; the LCM checkpoint is made for 1 to 4 steps",
                               steps)
        elif kind == "LCMScheduler":
            if not 1 <= steps <= 4:
                logger.warning("denoising_steps=%d: the LCM checkpoint works best with 1 to 4 steps", steps)
        else:
            raise ValueError(f"MarigoldPipeline runs with DDIMScheduler or LCMScheduler, not {kind}; set "
                             f"pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")


# -- image helpers ---------------------------------------------------------------------------------------------


def resize_max_res(image: PIL.Image.Image, max_edge: int, resample=PIL.Image.BILINEAR) -> PIL.Image.Image:
    """Resize so the longer side is ``max_edge``, keeping the aspect ratio (sizes rounded down)."""
    width, height = image.size
    scale = min(max_edge / width, max_edge / height)
    return image.resize((int(width * scale), int(height * scale)), resample=resample)


def _resize_float(array: np.ndarray, size, resample) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(array.astype(np.float32), mode="F").resize(size, resample=resample))


def normalize_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` mapped linearly onto [0, 1], and the range it was divided by (1 where ``x`` is constant)."""
    low, high = x.min(), x.max()
    span = torch.where(high > low, high - low, torch.ones_like(high))
    return (x - low) / span, span


def _base_color_map(name: str) -> str:
    base = name[:-2] if name.endswith("_r") else name
    if base not in _COLOR_MAPS:
        names = ", ".join(sorted(_COLOR_MAPS))
        raise ValueError(f"color_map={name!r} is not one of {names} (or their _r reversals), nor None")
    return base


def color_map_points(name: str) -> np.ndarray:
    """The control colours (K x 3, floats in [0, 1]) of a colour map, in order; ``name + "_r"`` reverses them."""
    points = np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in _COLOR_MAPS[_base_color_map(name)]])
    return points[::-1].copy() if name.endswith("_r") else points


def color_map_table(name: str) -> np.ndarray:
    """The 256 x 3 colour table of a colour map; ``name + "_r"`` reverses it."""
    points = color_map_points(_base_color_map(name))
    positions = np.linspace(0.0, 1.0, len(points))
    samples = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(samples, positions, points[:, c]) for c in range(3)], axis=1)
    return table[::-1] if name.endswith("_r") else table


def colorize_depth(depth: np.ndarray, color_map: str = "Spectral") -> PIL.Image.Image:
    """Colour an (H, W) map with values in [0, 1]."""
    table = color_map_table(color_map)
    index = np.clip((np.clip(depth, 0.0, 1.0) * 256).astype(np.int64), 0, 255)
    return PIL.Image.fromarray((table[index] * 255).round().astype(np.uint8))


# -- ensembling ------------------------------------------------------------------------------------------------


def ensemble_depths(depths: torch.Tensor, regularizer_strength: float = 0.02, max_iter: int = 2,
                    tol: float = 1e-3, reduction: str = "median", max_res: int | None = None):
    """Merge (E, H, W) affine-invariant depth maps into one, with its uncertainty, both (H, W).

    Each member i gets a scale s_i and shift t_i that minimise the RMS difference between every pair of
    aligned members, plus ``regularizer_strength`` times how far the merged map's range is from [0, 1] (without
    it, shrinking every map to a point would be optimal). The minimum is searched with BFGS from the members
    min-max normalised, for at most ``max_iter`` iterations, on maps downsampled to ``max_res`` if given. The
    merged map is the per-pixel median (uncertainty: median absolute deviation) or mean (uncertainty: standard
    deviation) of the aligned members, normalised to [0, 1] with the uncertainty in the same units.
    """
    if reduction not in ("median", "mean"):
        raise ValueError(f"ensemble reduction={reduction!r} is not 'median' or 'mean'")
    members = depths.shape[0]
    work = depths.to(torch.float64)
    if max_res is not None and max(work.shape[1:]) > max_res:
        scale = max_res / max(work.shape[1:])
        work = F.interpolate(work[:, None], scale_factor=scale, mode="nearest")[:, 0]
    flat = work.reshape(members, -1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    s0 = 1.0 / (high - low).clamp(min=1e-6)
    params0 = torch.cat([s0, -s0 * low])
    pairs = torch.combinations(torch.arange(members))

    def merge(aligned):
        return aligned.median(dim=0).values if reduction == "median" else aligned.mean(dim=0)

    def cost(params):
        aligned = flat * params[:members, None] + params[members:, None]
        spread = (aligned[pairs[:, 0]] - aligned[pairs[:, 1]]).pow(2).mean().sqrt()
        merged = merge(aligned)
        off_range = merged.min().abs() + (1.0 - merged.max()).abs()
        return spread + regularizer_strength * off_range

    params = minimize_bfgs(cost, params0, max_iter=max_iter, tol=tol)
    scale, shift = params[:members].to(depths.dtype), params[members:].to(depths.dtype)
    aligned = depths * scale[:, None, None] + shift[:, None, None]
    merged = merge(aligned)
    if reduction == "median":
        uncertainty = (aligned - merged).abs().median(dim=0).values
    else:
        uncertainty = aligned.std(dim=0)
    merged, span = normalize_range(merged)
    return merged, uncertainty / span


def minimize_bfgs(fn, x0: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Minimise ``fn(x) -> scalar tensor`` from ``x0`` with BFGS (Nocedal & Wright, alg. 6.1).

    Gradients come from autograd; each step searches along the quasi-Newton direction by backtracking until
    the Armijo condition holds. Stops after ``max_iter`` iterations or once the largest gradient entry is at
    most ``tol``.
    """

    def value_and_grad(x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            value = fn(x)
            (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    x = x0.detach().clone()
    value, grad = value_and_grad(x)
    eye = torch.eye(x.numel(), dtype=x.dtype)
    inverse_hessian, fresh = eye, True
    for _ in range(max_iter):
        if grad.abs().max() <= tol:
            break
        direction = -inverse_hessian @ grad
        slope = grad @ direction
        if slope >= 0:  # the curvature estimate went bad: fall back to steepest descent
            inverse_hessian, fresh, direction = eye, True, -grad
            slope = grad @ direction
        step = 1.0
        while True:
            candidate = x + step * direction
            new_value, new_grad = value_and_grad(candidate)
            if new_value <= value + 1e-4 * step * slope or step < 1e-10:
                break
            step /= 2
        if new_value > value:
            break
        s, y = candidate - x, new_grad - grad
        sy = s @ y
        if sy > 1e-12:
            if fresh:  # scale the identity guess to the curvature just observed (Nocedal & Wright, 6.20)
                inverse_hessian, fresh = eye * (sy / (y @ y)), False
            rho = 1.0 / sy
            left = eye - rho * torch.outer(s, y)
            inverse_hessian = left @ inverse_hessian @ left.T + rho * torch.outer(s, s)
        x, value, grad = candidate, new_value, new_grad
    return x
