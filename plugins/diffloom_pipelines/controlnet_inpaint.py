"""Stable Diffusion inpainting steered by one or several ControlNets.

The masked denoising (an inpainting UNet of 9 input channels reading the mask and the masked image's latents,
or a plain 4-channel UNet kept to the mask by blending) is the inpainting pipeline's; the ControlNet step is the
ControlNet pipeline's. The ControlNets read the noisy latents alone, never the mask channels. With
``padding_mask_crop`` the condition images are cut to the same box as the image and the mask.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.loop import CallState, StepState

from .controlnet import StableDiffusionControlNetPipeline, control_keep
from .controlnet_img2img import ControlImageArgument
from .img2img import check_strength_steps, strength_timesteps
from .inpaint import StableDiffusionInpaintPipeline
from .stable_diffusion import retrieve_timesteps


class StableDiffusionControlNetInpaintPipeline(ControlImageArgument, StableDiffusionControlNetPipeline,
                                               StableDiffusionInpaintPipeline):
    """Text-guided inpainting with Stable Diffusion steered by one or several ControlNets (inpainting UNets and
    plain ones)."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "control_image", "mask",
                               "masked_image_latents"]

    def run_denoiser(self, call: CallState, step: StepState):
        # An inpainting UNet's input carries the mask and masked-image channels after the latents' own.
        latents_only = replace(step, model_input=step.model_input[:, :step.latents.shape[1]])
        down, mid = self.control_residuals(call, latents_only)
        return self.unet(step.model_input, step.model_timestep, **step.conditioning,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]

    def prepare_control_image(self, image, width, height, batch, num_images_per_prompt, dtype, stacked: bool):
        """The condition image as in text-to-image, cut to the call's crop box (``padding_mask_crop``)."""
        call = self._call_state()
        image = self.control_image_processor.preprocess(image, height=height, width=width,
                                                        crops_coords=call.crops_coords,
                                                        resize_mode=call.resize_mode).to(torch.float32)
        image = image.repeat_interleave(batch if image.shape[0] == 1 else num_images_per_prompt, dim=0)
        image = image.to(device=self.device, dtype=dtype)
        return torch.cat([image] * 2) if stacked else image

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, mask_image=None, control_image=None,
                 height: int | None = None, width: int | None = None, padding_mask_crop: int | None = None,
                 strength: float = 1.0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 controlnet_conditioning_scale: float | list[float] = 0.5, guess_mode: bool = False,
                 control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(),
                 callback=None, callback_steps: int | None = None):
        if image is None:
            raise ValueError(f"{type(self).__name__} needs an image= to inpaint")
        if mask_image is None:
            raise ValueError(f"{type(self).__name__} needs a mask_image= (white where to inpaint)")
        self.check_control_image(control_image)
        self.check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop)
        if height is not None and width is not None:
            self.check_size(height, width)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        prompt_batch = self.batch_size_of(prompt, prompt_embeds)
        images, scales, starts, ends = self.control_settings(
            control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, prompt_batch)
        guess_mode = self.guess_mode_for(guess_mode)
        batch = prompt_batch * num_images_per_prompt
        device = self.device

        if padding_mask_crop is not None:
            height, width = self.image_processor.get_default_height_width(image, height, width)
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        else:
            crops_coords, resize_mode = None, "default"

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs,
                             guess_mode=guess_mode, control_scales=scales, crops_coords=crops_coords,
                             resize_mode=resize_mode) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            control, _, _ = self.prepare_control_images(images, width, height, batch, num_images_per_prompt,
                                                        guess_mode)

            original_image = image
            init_image = self.image_processor.preprocess(image, height=height, width=width,
                                                         crops_coords=crops_coords, resize_mode=resize_mode)
            init_image = init_image.to(dtype=torch.float32)
            mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width,
                                                            resize_mode=resize_mode, crops_coords=crops_coords)
            self.check_mask_matches(init_image, mask_condition)
            masked_image = init_image * (mask_condition < 0.5)
            height, width = init_image.shape[-2:]
            self.publish_control_images(call, control, (height, width))

            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
            timesteps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength)
            check_strength_steps(strength, num_inference_steps)
            latents, noise, image_latents = self.prepare_latents(
                batch, self.vae.config.latent_channels, height, width, dtype, device, generator, latents,
                image=init_image, timestep=timesteps[:1].repeat(batch), is_strength_max=strength == 1.0,
                return_image_latents=self.unet.config.in_channels == 4)
            mask, masked_image_latents = self.prepare_mask_latents(
                mask_condition, masked_image, batch, height, width, dtype, device, generator,
                self.do_classifier_free_guidance)

            call.tensors["mask"] = mask
            call.tensors["masked_image_latents"] = masked_image_latents
            call.settings.update(image_latents=image_latents, noise=noise, timesteps=timesteps,
                                 control_keep=control_keep(len(timesteps), starts, ends))
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            images, nsfw = self.decode_latents_to_images(call, latents, output_type, dtype, generator)
            if padding_mask_crop is not None:
                images = [self.image_processor.apply_overlay(mask_image, original_image, im, crops_coords)
                          for im in images]
            return self.finish_call(call, images, nsfw, return_dict)
