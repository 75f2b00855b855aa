"""Stable Diffusion image-to-image (SDEdit) steered by one or several ControlNets.

The image-to-image start (the input image noised to where ``strength`` of the schedule remains) and the
ControlNet step (residuals from a condition image, scaled and windowed) are the ones of the two pipelines this
one is made of. The call takes two images: ``image``, the picture to start from, and ``control_image``, what
the ControlNets read; ``control_image`` is also the name a ``callback_on_step_end`` reads and replaces it by.
"""

from __future__ import annotations

import torch

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.loop import CallState, StepState

from .controlnet import MultiControlNetModel, StableDiffusionControlNetPipeline, control_keep
from .img2img import StableDiffusionImg2ImgPipeline, check_strength_steps, strength_timesteps
from .stable_diffusion import retrieve_timesteps


class ControlImageArgument:
    """For ControlNet pipelines whose ``image`` is the picture to edit: the condition image is ``control_image``,
    in the call's arguments and in ``call.tensors``."""

    # Several ControlNets take one condition image (or batch) each, not rows of them per prompt.
    rows_of_control_images = False

    def control_residuals(self, call: CallState, step: StepState, added_cond_kwargs=None):
        # The ControlNet step reads its condition from call.tensors["image"]; a callback may have replaced
        # "control_image" since the last step.
        call.tensors["image"] = call.tensors["control_image"]
        return super().control_residuals(call, step, added_cond_kwargs)

    def check_control_image(self, control_image):
        if control_image is None:
            raise ValueError(f"{type(self).__name__} needs control_image= (the ControlNet's condition image); "
                             f"image= is the picture to start from")

    def publish_control_images(self, call: CallState, control: list, size):
        """Put the prepared condition images in ``call.tensors``; they must match the ``size`` of the latents'
        image, which the condition image (unlike in text-to-image) does not decide."""
        if tuple(control[0].shape[-2:]) != tuple(size):
            raise ValueError(f"control_image is {tuple(control[0].shape[-2:])} (height, width) but image is "
                             f"{tuple(size)}; give them one size, or pass height= and width= to resize both")
        call.tensors["control_image"] = control if isinstance(self.controlnet, MultiControlNetModel) else control[0]


class StableDiffusionControlNetImg2ImgPipeline(ControlImageArgument, StableDiffusionControlNetPipeline,
                                               StableDiffusionImg2ImgPipeline):
    """Text-guided image-to-image generation with Stable Diffusion steered by one or several ControlNets."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "control_image"]

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True):
        super().__init__(vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker,
                         feature_extractor, image_encoder=image_encoder,
                         requires_safety_checker=requires_safety_checker)
        # Unlike plain image-to-image, an RGBA or grayscale picture is taken as RGB.
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, control_image=None,
                 height: int | None = None, width: int | None = None, strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 controlnet_conditioning_scale: float | list[float] = 0.8, guess_mode: bool = False,
                 control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(),
                 callback=None, callback_steps: int | None = None):
        self.check_strength(strength)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs an image= to start from")
        self.check_control_image(control_image)
        if height is not None and width is not None:
            self.check_size(height, width)
        prompt_batch = self.batch_size_of(prompt, prompt_embeds)
        images, scales, starts, ends = self.control_settings(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, prompt_batch)
        guess_mode = self.guess_mode_for(guess_mode)
        batch = prompt_batch * num_images_per_prompt

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs,
                             guess_mode=guess_mode, control_scales=scales) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            init_image = self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)
            control, _, _ = self.prepare_control_images(images, width, height, batch, num_images_per_prompt,
                                                        guess_mode)
            self.publish_control_images(call, control, init_image.shape[-2:])
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device)
            timesteps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength)
            check_strength_steps(strength, len(timesteps))
            if latents is None:
                latents = self.prepare_latents(init_image, timesteps[:1].repeat(batch), prompt_batch,
                                               num_images_per_prompt, dtype, self.device, generator)
            else:
                latents = latents.to(self.device)  # taken as the noised start, as they are
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            call.settings["control_keep"] = control_keep(len(timesteps), starts, ends)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            images, nsfw = self.decode_latents_to_images(call, latents, output_type, dtype, generator)
            return self.finish_call(call, images, nsfw, return_dict)
