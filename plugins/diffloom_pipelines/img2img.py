"""Stable Diffusion image-to-image (SDEdit, Meng et al. 2021).

The input image is encoded, noised to the timestep where ``strength`` of the schedule remains, and denoised
from there: strength 1 ignores the image's content, strength 0 returns it unchanged.
"""

from __future__ import annotations

import torch

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.randomness import randn_tensor

from .stable_diffusion import (StableDiffusionPipelineBase, check_generators, retrieve_latents,
                               retrieve_timesteps)


def strength_timesteps(scheduler, num_inference_steps: int, strength: float):
    """The tail of the schedule that ``strength`` keeps, and its number of steps.

    The scheduler is told where its schedule now begins, so that index-based schedulers step correctly.
    """
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - kept, 0)
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return timesteps, num_inference_steps - start


def check_strength_steps(strength, num_inference_steps, denoising_start=None):
    """At least one denoising step must remain of the schedule that ``strength`` (or, when it is a fraction,
    ``denoising_start``, which then decides alone) keeps."""
    if num_inference_steps >= 1:
        return
    if denoising_start is not None:
        raise ValueError(f"denoising_start={denoising_start} leaves {num_inference_steps} denoising steps: no "
                         f"timestep of the schedule lies below it; lower denoising_start or raise "
                         f"num_inference_steps")
    raise ValueError(f"strength={strength} leaves {num_inference_steps} denoising steps; raise strength or "
                     f"num_inference_steps so that int(num_inference_steps * strength) >= 1")


def encode_image_latents(vae, image, generator) -> torch.Tensor:
    """Scaled VAE latents of an image batch; a list of generators draws one image's posterior sample each."""
    if isinstance(generator, list):
        latents = torch.cat([retrieve_latents(vae.encode(image[i:i + 1]), generator=generator[i])
                             for i in range(image.shape[0])], dim=0)
    else:
        latents = retrieve_latents(vae.encode(image), generator=generator)
    return vae.config.scaling_factor * latents


class StableDiffusionImg2ImgPipeline(StableDiffusionPipelineBase):
    """Text-guided image-to-image generation with Stable Diffusion."""

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        image = image.to(device=device, dtype=dtype)
        batch = batch_size * num_images_per_prompt
        if image.shape[1] == self.vae.config.latent_channels:
            init_latents = image  # the image is latents already (from an output_type="latent" call)
        else:
            check_generators(generator, batch)
            if isinstance(generator, list) and image.shape[0] < batch:
                image = repeat_to_batch(image, batch, "image")
            init_latents = encode_image_latents(self.vae, image, generator)
        init_latents = repeat_to_batch(init_latents, batch, "image")
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, strength: float = 0.8,
                 num_inference_steps: int = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 ip_adapter_image=None, ip_adapter_image_embeds: list[torch.Tensor] | None = None,
                 output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(), callback=None,
                 callback_steps: int | None = None):
        self.check_strength(strength)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        if image is None:
            raise ValueError("StableDiffusionImg2ImgPipeline needs an image= to start from")
        batch_size = self.batch_size_of(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            image = self.image_processor.preprocess(image)
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device,
                                                                timesteps, sigmas)
            timesteps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength)
            # As in diffusers, PNDM's extra final timestep still runs when strength keeps no whole step.
            check_strength_steps(strength, len(timesteps))
            latent_timestep = timesteps[:1].repeat(batch)
            latents = self.prepare_latents(image, latent_timestep, batch_size, num_images_per_prompt, dtype,
                                           self.device, generator)
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            images, nsfw = self.decode_latents_to_images(call, latents, output_type, dtype, generator)
            return self.finish_call(call, images, nsfw, return_dict)


def repeat_to_batch(tensor: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Repeat a batch of images (or masks) to ``batch`` items; their number must divide it."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] > batch or batch % tensor.shape[0]:
        raise ValueError(f"got {tensor.shape[0]} {name}s for {batch} images (prompts x num_images_per_prompt); "
                         f"pass one {name} per image, or a number that divides it")
    return tensor.repeat(batch // tensor.shape[0], *[1] * (tensor.ndim - 1))
