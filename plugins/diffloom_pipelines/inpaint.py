"""Stable Diffusion inpainting: regenerate the white part of a mask, keep the rest of the image.

Two kinds of UNet are served. An inpainting UNet (9 input channels) sees, besides the noisy latents, the mask
downsampled to latent size and the latents of the image with the masked part blacked out. A plain UNet (4
channels) denoises as in text-to-image, and after each step the unmasked region is reset to the original
image's latents noised to the next timestep, so only the masked region is generated.

With ``padding_mask_crop`` only a box around the mask (grown by that many pixels and widened to the output's
aspect ratio) is generated, at full resolution, and pasted back into the original image.
"""

from __future__ import annotations

import logging

import PIL.Image
import torch
import torch.nn.functional as F

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.loop import CallState, StepState
from diffloom.randomness import randn_tensor

from .img2img import check_strength_steps, encode_image_latents, repeat_to_batch, strength_timesteps
from .stable_diffusion import StableDiffusionPipelineBase, check_generators, retrieve_timesteps

logger = logging.getLogger(__name__)


class MaskedDenoising:
    """The denoising steps of inpainting, shared by the SD and SDXL pipelines: an inpainting UNet (9 input
    channels) reads the mask and the masked image's latents; a plain UNet is kept to the mask by putting the
    original back outside it after every step."""

    def prepare_model_input(self, call: CallState, step: StepState):
        super().prepare_model_input(call, step)
        if self.unet.config.in_channels == 9:
            step.model_input = torch.cat(
                [step.model_input, call.tensors["mask"], call.tensors["masked_image_latents"]], dim=1)

    def scheduler_step(self, call: CallState, step: StepState):
        latents = super().scheduler_step(call, step)
        if self.unet.config.in_channels != 4:
            return latents
        # Plain UNet: put the original back outside the mask, at the noise level of the next step.
        original = call.settings["image_latents"]
        mask = call.tensors["mask"]
        keep_mask = mask.chunk(2)[0] if self.do_classifier_free_guidance else mask
        timesteps = call.settings["timesteps"]
        if step.index < len(timesteps) - 1:
            original = self.scheduler.add_noise(original, call.settings["noise"],
                                                timesteps[step.index + 1:step.index + 2])
        return (1 - keep_mask) * original + keep_mask * latents


class StableDiffusionInpaintPipeline(MaskedDenoising, StableDiffusionPipelineBase):
    """Text-guided inpainting with Stable Diffusion (inpainting UNets and plain ones)."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents"]
    _scheduler_fixes = {"steps_offset": 1, "skip_prk_steps": True}

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True):
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        if unet is not None and unet.config.in_channels != 9:
            logger.info("%s has a %d-channel UNet, not an inpainting one; the unmasked region is kept by "
                        "blending latents after each step", type(self).__name__, unet.config.in_channels)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    # -- preparation -------------------------------------------------------------------------------------------

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None, image=None, timestep=None, is_strength_max=True, return_image_latents=False):
        """``(latents, noise, image_latents)``: pure noise at strength 1, else the image's latents noised to
        ``timestep``. ``image_latents`` is None unless asked for (plain UNets blend with it)."""
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        check_generators(generator, batch_size)
        image_latents = None
        if return_image_latents or (latents is None and not is_strength_max):
            image = image.to(device=device, dtype=dtype)
            if image.shape[1] == self.vae.config.latent_channels:
                image_latents = image
            else:
                image_latents = encode_image_latents(self.vae, image, generator)
            image_latents = repeat_to_batch(image_latents, batch_size, "image")
        if latents is None:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if is_strength_max:
                latents = noise * self.scheduler.init_noise_sigma
            else:
                latents = self.scheduler.add_noise(image_latents, noise, timestep)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {shape}")
            noise = latents.to(device)
            latents = noise * self.scheduler.init_noise_sigma
        return latents, noise, image_latents

    def prepare_mask_latents(self, mask, masked_image, batch_size, height, width, dtype, device, generator,
                             do_classifier_free_guidance):
        """The mask at latent resolution and the masked image's latents, batched (twice over with guidance)."""
        f = self.vae_scale_factor
        mask = F.interpolate(mask, size=(height // f, width // f)).to(device=device, dtype=dtype)
        masked_image = masked_image.to(device=device, dtype=dtype)
        if masked_image.shape[1] == self.vae.config.latent_channels:
            masked_image_latents = masked_image
        else:
            masked_image_latents = encode_image_latents(self.vae, masked_image, generator)
        mask = repeat_to_batch(mask, batch_size, "mask")
        masked_image_latents = repeat_to_batch(masked_image_latents, batch_size, "masked image")
        if do_classifier_free_guidance:
            mask = torch.cat([mask] * 2)
            masked_image_latents = torch.cat([masked_image_latents] * 2)
        return mask, masked_image_latents.to(device=device, dtype=dtype)

    # -- the call ----------------------------------------------------------------------------------------------

    def check_inpaint_inputs(self, image, mask_image, strength, output_type, padding_mask_crop):
        self.check_strength(strength)
        if image is None:
            raise ValueError("StableDiffusionInpaintPipeline needs an image= to inpaint")
        if mask_image is None:
            raise ValueError("StableDiffusionInpaintPipeline needs a mask_image= (white where to inpaint)")
        if padding_mask_crop is not None:
            for name, value in (("image", image), ("mask_image", mask_image)):
                if not isinstance(value, PIL.Image.Image):
                    raise ValueError(f"padding_mask_crop needs {name} as a PIL image, got {type(value).__name__}")
            if output_type != "pil":
                raise ValueError(f"padding_mask_crop pastes the result into the original PIL image, so it needs "
                                 f"output_type='pil', got {output_type!r}")
        in_channels = self.unet.config.in_channels
        if in_channels not in (4, 9):
            raise ValueError(f"{type(self).__name__} works with UNets of 4 or 9 input channels; this one has "
                             f"{in_channels}")

    @staticmethod
    def check_mask_matches(init_image, mask_condition):
        n_img, n_mask = init_image.shape[0], mask_condition.shape[0]
        if init_image.shape[-2:] != mask_condition.shape[-2:] or (n_img != n_mask and 1 not in (n_img, n_mask)):
            raise ValueError(
                f"mask_image does not match image: {n_mask} mask(s) of {tuple(mask_condition.shape[-2:])} for "
                f"{n_img} image(s) of {tuple(init_image.shape[-2:])}; pass one mask for all images or one per "
                f"image, of the image's size (or pass masked_image_latents)")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, mask_image=None,
                 masked_image_latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, padding_mask_crop: int | None = None, strength: float = 1.0,
                 num_inference_steps: int = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(),
                 callback=None, callback_steps: int | None = None):
        height, width = self.default_height_width(height, width)
        self.check_size(height, width)
        self.check_inpaint_inputs(image, mask_image, strength, output_type, padding_mask_crop)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        batch = self.batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        device = self.device

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                                timesteps, sigmas)
            timesteps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength)
            check_strength_steps(strength, num_inference_steps)
            latent_timestep = timesteps[:1].repeat(batch)

            if padding_mask_crop is not None:
                crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
                resize_mode = "fill"
            else:
                crops_coords, resize_mode = None, "default"
            original_image = image
            init_image = self.image_processor.preprocess(image, height=height, width=width,
                                                         crops_coords=crops_coords, resize_mode=resize_mode)
            init_image = init_image.to(dtype=torch.float32)

            plain_unet = self.unet.config.in_channels == 4
            num_channels_latents = self.vae.config.latent_channels
            latents, noise, image_latents = self.prepare_latents(
                batch, num_channels_latents, height, width, dtype, device, generator, latents, image=init_image,
                timestep=latent_timestep, is_strength_max=strength == 1.0, return_image_latents=plain_unet)

            mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width,
                                                            resize_mode=resize_mode, crops_coords=crops_coords)
            if masked_image_latents is None:
                self.check_mask_matches(init_image, mask_condition)
                masked_image = init_image * (mask_condition < 0.5)
            else:
                masked_image = masked_image_latents
            mask, masked_image_latents = self.prepare_mask_latents(
                mask_condition, masked_image, batch, height, width, dtype, device, generator,
                self.do_classifier_free_guidance)
            if not plain_unet:
                seen = num_channels_latents + mask.shape[1] + masked_image_latents.shape[1]
                if seen != self.unet.config.in_channels:
                    raise ValueError(
                        f"the UNet takes {self.unet.config.in_channels} input channels, but latents ("
                        f"{num_channels_latents}) + mask ({mask.shape[1]}) + masked image latents "
                        f"({masked_image_latents.shape[1]}) make {seen}; check mask_image and masked_image_latents")

            call.tensors["mask"] = mask
            call.tensors["masked_image_latents"] = masked_image_latents
            call.settings.update(image_latents=image_latents, noise=noise, timesteps=timesteps)
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            images, nsfw = self.decode_latents_to_images(call, latents, output_type, dtype, generator)
            if padding_mask_crop is not None:
                images = [self.image_processor.apply_overlay(mask_image, original_image, im, crops_coords)
                          for im in images]
            return self.finish_call(call, images, nsfw, return_dict)
