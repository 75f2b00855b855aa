"""Random draws that reproduce diffusers' images for the same seeds.

A CPU generator driving a GPU pipeline draws on the CPU and moves the result, so a seed gives the same
noise on every device. A list of generators draws one batch item from each, in order.
"""

from __future__ import annotations

import torch


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    layout = layout or torch.strided
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    draw_device = device
    if generator is not None:
        gen_device = (generator[0] if isinstance(generator, (list, tuple)) else generator).device
        if gen_device.type != device.type:
            if gen_device.type != "cpu":
                raise ValueError(f"a generator on {gen_device} cannot draw noise for {device}; "
                                 f"create it on {device} or on the CPU")
            draw_device = torch.device("cpu")
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per item")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=draw_device, dtype=dtype, layout=layout)
                 for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype, layout=layout).to(device)
