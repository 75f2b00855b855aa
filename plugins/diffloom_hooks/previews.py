"""Per-step previews: latents to RGB through a linear map, no VAE decode.

The 4x3 maps approximate the VAE decoders of Stable Diffusion 1.x/2.x and SDXL well enough to watch an image
form (the widely used community constants). The family is told apart by the VAE's ``scaling_factor``
(0.13025 for SDXL's VAE, 0.18215 for SD 1.x/2.x) unless ``family`` is given.

Any other VAE would get false colours from those tables. For it, :func:`fit_latent_rgb` measures a map instead
(once per VAE): it decodes a few seeded random latents and solves for the linear map (plus bias) that best
predicts the mean colour of each latent pixel's patch, by least squares. A map can also be given as ``rgb_map=``.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffloom import hookimpl

LATENT_RGB = {
    "sd": ([[0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341],
              [-0.2533, -0.0042, 0.1068],
              [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}


def latents_to_rgb(latents, family: str = "sd", rgb_map=None):
    """One latent image (C, h, w) -> PIL image (w, h), through ``rgb_map`` (``(weights C x 3, bias 3)``, as
    :func:`fit_latent_rgb` returns) or else the family's 4x3 map."""
    import torch
    from PIL import Image

    if rgb_map is None:
        if family not in LATENT_RGB:
            raise ValueError(f"family={family!r} is not one of {sorted(LATENT_RGB)}")
        rgb_map = LATENT_RGB[family]
    weights = torch.as_tensor(rgb_map[0], dtype=torch.float32)
    bias = torch.as_tensor(rgb_map[1], dtype=torch.float32)
    if latents.ndim != 3 or latents.shape[0] != weights.shape[0]:
        raise ValueError(f"latents_to_rgb takes one ({weights.shape[0]}, h, w) latent image for this map, got "
                         f"shape {tuple(latents.shape)}")
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), weights) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def fit_latent_rgb(vae, samples: int = 8, size: int = 8, seed: int = 0):
    """The linear map ``(weights C x 3, bias 3)`` from latents, as a pipeline holds them (scaled by the VAE's
    ``scaling_factor``), to the colours ``vae`` decodes them to, in [-1, 1].

    ``samples`` latents of ``size`` x ``size`` are drawn from a seeded standard normal (the distribution the
    scaling factor normalises latents to), decoded, and each latent pixel is paired with the mean colour of the
    patch it decodes to; least squares over all pairs gives the map. A few small decodes: fast on a CPU.
    """
    import torch

    config = vae.config
    channels = config.get("latent_channels", 4)
    parameter = next(vae.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(samples, channels, size, size, generator=generator)
    unscaled = latents / config.get("scaling_factor", 1.0) + (config.get("shift_factor") or 0.0)
    with torch.no_grad():
        decoded = vae.decode(unscaled.to(device=parameter.device, dtype=parameter.dtype)).sample
    # One mean colour per latent pixel.
    patches = torch.nn.functional.avg_pool2d(decoded.float().cpu(), decoded.shape[-1] // size)
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)  # the last row of the solution is the bias
    targets = patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
    solution = torch.linalg.lstsq(inputs, targets).solution
    return solution[:channels].tolist(), solution[channels].tolist()


_FAMILY_SCALING_FACTORS = {"sdxl": 0.13025, "sd": 0.18215}


def guess_family(pipe) -> str | None:
    """The family whose table fits ``pipe``'s VAE, told by its scaling factor; None for any other VAE."""
    vae = getattr(pipe, "vae", None)
    factor = getattr(getattr(vae, "config", None), "get", lambda *_: None)("scaling_factor")
    if factor is None:
        return "sd"
    return next((family for family, known in _FAMILY_SCALING_FACTORS.items() if abs(factor - known) < 1e-4), None)


class LatentPreview:
    """After every ``every``-th step, turn the first image's latents into a small RGB preview.

    ``target`` is a folder (previews are written as ``step_0000.png``...) or a function
    ``target(step_index, image)``. ``rgb_map`` (from :func:`fit_latent_rgb`) replaces the family's table; with
    neither given, a VAE of no known family gets a map fitted to it on first use.
    """

    def __init__(self, target, every: int = 1, family: str | None = None, index: int = 0, rgb_map=None):
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        if family is not None and family not in LATENT_RGB:
            raise ValueError(f"family={family!r} is not one of {sorted(LATENT_RGB)}")
        if rgb_map is not None and family is not None:
            raise ValueError("give family= or rgb_map=, not both: the map replaces the family's table")
        self.target = target
        self.every = every
        self.family = family
        self.index = index
        self.rgb_map = rgb_map
        self._fitted: dict[int, tuple] = {}  # id(vae) -> its fitted map
        if not callable(target):
            os.makedirs(target, exist_ok=True)

    @hookimpl
    def on_step_end(self, pipe, call, step):
        if step.index % self.every:
            return
        family, rgb_map = self.family, self.rgb_map
        if family is None and rgb_map is None:
            family = guess_family(pipe)
            if family is None:
                rgb_map = self._fitted.get(id(pipe.vae))
                if rgb_map is None:
                    rgb_map = self._fitted[id(pipe.vae)] = fit_latent_rgb(pipe.vae)
        latents = step.latents
        channels = len(rgb_map[0]) if rgb_map is not None else 4
        if latents.ndim != 4 or latents.shape[1] != channels:
            return  # not the latent space the map is for: nothing sensible to show
        image = latents_to_rgb(latents[self.index], family or "sd", rgb_map=rgb_map)
        if callable(self.target):
            self.target(step.index, image)
        else:
            image.save(Path(self.target) / f"step_{step.index:04d}.png")
