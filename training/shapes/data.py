"""Procedural images of one coloured shape on a plain background, with the prompt that describes each.

An image is 128x128 RGB: a circle, an axis-aligned square or an upright isosceles triangle (apex up, base at the
bottom), whose bounding box is 30-70% of the side, placed at random but wholly inside the frame, filled with one
of five colours, on a white, black or gray background. Shapes are drawn from signed distances with one pixel of
anti-aliasing, so edges look like a rasteriser's and the VAE never has to learn jagged staircases.

The prompt is "a {colour} {shape}", followed by " on a {background} background" 70% of the time; when the phrase
is dropped the background is still drawn at random, so the model learns that an unnamed background may be any.

All randomness comes from a CPU ``torch.Generator``: the same seed gives the same batch on any device, and the
rendering itself (pure tensor arithmetic) runs wherever the images are wanted.
"""

from __future__ import annotations

import itertools

import torch

IMAGE_SIZE = 128
# Reference colours (sRGB, 0-255). The acceptance test's detector uses the same table.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

SIZE_RANGE = (0.30, 0.70)  # bounding-box side as a fraction of the image side
MARGIN = 2.0  # pixels kept free between the shape and the border
BACKGROUND_PHRASE_P = 0.7


def prompt_for(colour: str, shape: str, background: str | None) -> str:
    text = f"a {colour} {shape}"
    return text if background is None else f"{text} on a {background} background"


def all_prompts(with_background: bool = True) -> list[tuple[str, str, str | None]]:
    """Every (colour, shape, background) of the grammar; background None when ``with_background`` is off."""
    backgrounds = list(BACKGROUNDS) if with_background else [None]
    return list(itertools.product(COLOURS, SHAPES, backgrounds))


def _palette(table: dict, index: torch.Tensor, device) -> torch.Tensor:
    """(n,) indices into ``table`` -> (n, 3, 1, 1) colours in [0, 1]."""
    rgb = torch.tensor(list(table.values()), dtype=torch.float32, device=device) / 255.0
    return rgb[index.to(device)][:, :, None, None]


def _signed_distance(shape: torch.Tensor, cx, cy, size, xs, ys) -> torch.Tensor:
    """Signed distance in pixels to each shape's outline (negative inside), (n, H, W).

    Exact for the circle; for the square and the triangle it is the largest signed distance to their edges'
    lines, exact inside and along the edges, which is all that one pixel of anti-aliasing needs.
    """
    dx, dy = xs - cx, ys - cy  # (n, H, W): pixel centres relative to the shape's centre
    half = size / 2
    circle = torch.sqrt(dx * dx + dy * dy) - half
    square = torch.maximum(dx.abs(), dy.abs()) - half
    # Triangle with apex (0, -half) and base corners (+-half, +half): the base line, and the two slanted edges
    # whose outward normals are (+-2, -1) / sqrt(5), each through the apex.
    base = dy - half
    slant = (2 * dx.abs() - (dy + half)) / 5 ** 0.5
    triangle = torch.maximum(base, slant)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render(shape, colour, background, cx, cy, size, device=None) -> torch.Tensor:
    """Images (n, 3, 128, 128) in [-1, 1] from per-image indices (into SHAPES, COLOURS, BACKGROUNDS) and the
    bounding box's centre and side in pixels (all 1-D tensors of length n)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32, device=device) + 0.5
    ys, xs = coords[None, :, None], coords[None, None, :]
    shape, cx, cy, size = (torch.as_tensor(t).to(device=device, dtype=torch.float32)[:, None, None]
                           for t in (shape, cx, cy, size))
    distance = _signed_distance(shape, cx, cy, size, xs, ys)
    coverage = (0.5 - distance).clamp(0.0, 1.0)[:, None]
    fg = _palette(COLOURS, torch.as_tensor(colour), device)
    bg = _palette(BACKGROUNDS, torch.as_tensor(background), device)
    return (bg + (fg - bg) * coverage) * 2.0 - 1.0


def sample_batch(n: int, generator: torch.Generator, device=None) -> tuple[torch.Tensor, list[str]]:
    """``n`` random images (n, 3, 128, 128) in [-1, 1] and their prompts, drawn from ``generator`` (CPU)."""
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    background = torch.randint(len(BACKGROUNDS), (n,), generator=generator)
    lo, hi = SIZE_RANGE
    size = (lo + (hi - lo) * torch.rand(n, generator=generator)) * IMAGE_SIZE
    # Centres anywhere that keeps the whole bounding box MARGIN pixels inside the frame.
    room = IMAGE_SIZE - size - 2 * MARGIN
    cx = MARGIN + size / 2 + room * torch.rand(n, generator=generator)
    cy = MARGIN + size / 2 + room * torch.rand(n, generator=generator)
    named = torch.rand(n, generator=generator) < BACKGROUND_PHRASE_P

    colour_names, background_names = list(COLOURS), list(BACKGROUNDS)
    prompts = [prompt_for(colour_names[c], SHAPES[s], background_names[b] if keep else None)
               for s, c, b, keep in zip(shape.tolist(), colour.tolist(), background.tolist(), named.tolist())]
    return render(shape, colour, background, cx, cy, size, device), prompts
