"""The smallest custom pipeline: one UNet forward at timestep 1 and one scheduler step.

It exists to show (and test) how a pipeline of your own is written and loaded: any folder with a ``unet`` and a
``scheduler`` (a DDPM model, for one) loads into it.
"""

import inspect

import torch

from diffloom import DiffusionPipeline, randn_tensor


class UnetSchedulerOneForwardPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, generator=None):
        size = self.unet.config.sample_size
        shape = (1, self.unet.config.in_channels, size, size)
        image = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        timestep = 1
        model_output = self.unet(image, timestep).sample
        # Stochastic schedulers (DDPM) draw noise in step(): give them the generator so a seed fixes the result.
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        extra = {"generator": generator} if takes_generator else {}
        return self.scheduler.step(model_output, timestep, image, **extra).prev_sample
