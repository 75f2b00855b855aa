"""Unconditional image generation with DDIM sampling (Song et al. 2020): DDPM's model, fewer steps.

``eta`` moves between the deterministic DDIM sampler (0) and DDPM-like ancestral sampling (1). Whatever
scheduler the folder names, sampling uses a DDIM scheduler built from its config.
"""

from __future__ import annotations

import logging

import torch

from .ddpm import UnconditionalImagePipeline

logger = logging.getLogger(__name__)


class DDIMPipeline(UnconditionalImagePipeline):
    def __init__(self, unet, scheduler):
        from diffloom import DDIMScheduler

        super().__init__(unet, DDIMScheduler.from_config(scheduler.config))

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 eta: float = 0.0, num_inference_steps: int = 50, use_clipped_model_output: bool | None = None,
                 output_type: str = "pil", return_dict: bool = True, hooks=()):
        if not 0.0 <= eta <= 1.0:
            logger.warning("eta=%s is outside [0, 1] (0 is DDIM, 1 is DDPM-like); results may be unexpected", eta)
        return self.sample(batch_size, generator, num_inference_steps, output_type, return_dict, hooks, eta=eta,
                           use_clipped_model_output=use_clipped_model_output)
