"""Unconditional image generation with a pixel-space UNet: DDPM (Ho et al. 2020) ancestral sampling.

The loop is the core's: draw Gaussian noise the shape of an image, let the scheduler walk it back step by
step with the UNet's noise prediction, and map [-1, 1] to [0, 1].
"""

from __future__ import annotations

import torch

from diffloom.images import numpy_to_pil
from diffloom.loop import CallState, StepState
from diffloom.pipeline import DiffusionPipeline, ImagePipelineOutput
from diffloom.randomness import randn_tensor

IMAGE_OUTPUT_TYPES = ("pil", "np", "pt")


class UnconditionalImagePipeline(DiffusionPipeline):
    """What DDPM and DDIM sampling share: a UNet2DModel on pixels, no conditioning, no guidance."""

    denoiser_components = ("unet",)

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def image_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *size)

    def prepare_model_input(self, call: CallState, step: StepState):
        # These pipelines feed the UNet the sample as it is (their schedulers do not scale inputs).
        step.model_input = step.latents
        step.model_timestep = step.timestep

    def run_denoiser(self, call: CallState, step: StepState):
        return self.unet(step.model_input, step.model_timestep).sample

    def sample(self, batch_size, generator, num_inference_steps, output_type, return_dict, hooks, **step_kwargs):
        if output_type not in IMAGE_OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(IMAGE_OUTPUT_TYPES)}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got a list of {len(generator)} generators for batch_size={batch_size}; pass one "
                             f"generator per image, or a single generator")
        with self.start_call(hooks=hooks, extra_step_kwargs={**step_kwargs, "generator": generator}) as call:
            call.hook.on_call_start(pipe=self, call=call)
            image = randn_tensor(self.image_shape(batch_size), generator=generator, device=self.device,
                                 dtype=self.unet.dtype)
            self.scheduler.set_timesteps(num_inference_steps)
            image = self.denoise(call, image, self.scheduler.timesteps)
            image = call.fire_after_decode(image)
            image = (image / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                image = image.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    image = numpy_to_pil(image)
            output = ImagePipelineOutput(images=image) if return_dict else (image,)
            call.hook.on_call_end(pipe=self, call=call, output=output)
            return output


class DDPMPipeline(UnconditionalImagePipeline):
    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 num_inference_steps: int = 1000, output_type: str = "pil", return_dict: bool = True, hooks=()):
        return self.sample(batch_size, generator, num_inference_steps, output_type, return_dict, hooks)
