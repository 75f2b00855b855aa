"""Per-step previews: latents to RGB through a linear map, no VAE decode.

The 4x3 maps approximate the VAE decoders of Stable Diffusion 1.x/2.x and SDXL well enough to watch an image
form (the widely used community constants). The family is told apart by the VAE's ``scaling_factor``
(0.13025 for SDXL's VAE, 0.18215 for SD 1.x/2.x) unless ``family`` is given.
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


def latents_to_rgb(latents, family: str = "sd"):
    """One latent image (4, h, w) -> PIL image (w, h), through the family's linear map."""
    import torch
    from PIL import Image

    if family not in LATENT_RGB:
        raise ValueError(f"family={family!r} is not one of {sorted(LATENT_RGB)}")
    if latents.ndim != 3 or latents.shape[0] != 4:
        raise ValueError(f"latents_to_rgb takes one (4, h, w) latent image, got shape {tuple(latents.shape)}")
    weights, bias = LATENT_RGB[family]
    weights = torch.tensor(weights, dtype=torch.float32)
    bias = torch.tensor(bias, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), weights) + bias
    pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def guess_family(pipe) -> str:
    vae = getattr(pipe, "vae", None)
    factor = getattr(getattr(vae, "config", None), "get", lambda *_: None)("scaling_factor")
    return "sdxl" if factor is not None and abs(factor - 0.13025) < 1e-4 else "sd"


class LatentPreview:
    """After every ``every``-th step, turn the first image's latents into a small RGB preview.

    ``target`` is a folder (previews are written as ``step_0000.png``...) or a function
    ``target(step_index, image)``.
    """

    def __init__(self, target, every: int = 1, family: str | None = None, index: int = 0):
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        if family is not None and family not in LATENT_RGB:
            raise ValueError(f"family={family!r} is not one of {sorted(LATENT_RGB)}")
        self.target = target
        self.every = every
        self.family = family
        self.index = index
        if not callable(target):
            os.makedirs(target, exist_ok=True)

    @hookimpl
    def on_step_end(self, pipe, call, step):
        if step.index % self.every:
            return
        latents = step.latents
        if latents.ndim != 4 or latents.shape[1] != 4:
            return  # not an SD-style latent space: nothing sensible to show
        image = latents_to_rgb(latents[self.index], self.family or guess_family(pipe))
        if callable(self.target):
            self.target(step.index, image)
        else:
            image.save(Path(self.target) / f"step_{step.index:04d}.png")
