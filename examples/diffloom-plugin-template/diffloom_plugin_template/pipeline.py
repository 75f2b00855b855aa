"""An unconditional image pipeline built on the core's denoising loop, so every loop hook fires.

A pipeline lists its components in ``__init__`` and registers them; ``from_pretrained`` then loads any folder
in the diffusers layout that has them (a DDPM model folder has a ``unet`` and a ``scheduler``). ``__call__``
opens a call (``start_call``: per-call state, so one pipeline serves several threads), runs ``denoise`` and
fires the call-level hooks around it. A subclass changes a step by overriding ``prepare_model_input``,
``run_denoiser``, ``guide`` or ``scheduler_step``, never the loop itself.
"""

import torch

from diffloom import DiffusionPipeline, ImagePipelineOutput, randn_tensor


class TemplatePipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def run_denoiser(self, call, step):
        return self.unet(step.model_input, step.model_timestep).sample

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 10, generator=None, hooks=()):
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        with self.start_call(hooks=hooks) as call:
            call.hook.on_call_start(pipe=self, call=call)
            self.scheduler.set_timesteps(num_inference_steps)
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            images = self.denoise(call, noise * self.scheduler.init_noise_sigma, self.scheduler.timesteps)
            images = call.fire_after_decode(images)
            output = ImagePipelineOutput(images=(images / 2 + 0.5).clamp(0, 1))
            call.hook.on_call_end(pipe=self, call=call, output=output)
            return output
