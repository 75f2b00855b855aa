"""Stable Diffusion XL inpainting: regenerate the white part of a mask with SDXL's conditioning.

As for SD v1 (see ``inpaint.py``): an inpainting UNet (9 input channels) reads the mask and the masked image's
latents next to the noisy latents; a plain UNet (4 channels) denoises freely and, after every step, the region
outside the mask is reset to the original image's latents noised to the next timestep. As for the SDXL refiner
(see ``sdxl.py``), ``denoising_start`` resumes a base pipeline's latents instead of noising the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.randomness import randn_tensor

from .img2img import check_strength_steps, repeat_to_batch
from .inpaint import MaskedDenoising, StableDiffusionInpaintPipeline
from .sdxl import (StableDiffusionXLImg2ImgPipeline, check_denoising_range, cut_at_denoising_end,
                   is_fraction)
from .stable_diffusion import check_generators, retrieve_timesteps


class StableDiffusionXLInpaintPipeline(MaskedDenoising, StableDiffusionXLImg2ImgPipeline):
    """Text-guided inpainting with Stable Diffusion XL (inpainting UNets and plain ones)."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids", "mask",
                               "masked_image_latents"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, requires_aesthetics_score: bool = False,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         requires_aesthetics_score=requires_aesthetics_score,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    # -- preparation -------------------------------------------------------------------------------------------

    def prepare_inpaint_latents(self, batch, height, width, dtype, generator, latents, image, timestep,
                                is_strength_max, add_noise, need_image_latents):
        """``(latents, noise, image_latents)``: pure noise at strength 1, the image's latents noised to
        ``timestep`` below it, or (resuming at ``denoising_start``) the given latents as they are."""
        device = self.device
        channels = self.vae.config.latent_channels
        shape = (batch, channels, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        check_generators(generator, batch)
        image_latents = None
        if image.shape[1] == channels:
            image_latents = repeat_to_batch(image.to(device=device, dtype=dtype), batch, "image")
        elif need_image_latents or (latents is None and not is_strength_max):
            image_latents = self.encode_image(image.to(device=device, dtype=dtype), generator, dtype,
                                              normalize=False)
            image_latents = repeat_to_batch(image_latents, batch, "image")
        if not add_noise:
            return image_latents, randn_tensor(shape, generator=generator, device=device, dtype=dtype), image_latents
        if latents is not None:
            return latents.to(device) * self.scheduler.init_noise_sigma, latents.to(device), image_latents
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if is_strength_max:
            return noise * self.scheduler.init_noise_sigma, noise, image_latents
        return self.scheduler.add_noise(image_latents, noise, timestep), noise, image_latents

    def prepare_mask_latents(self, mask, masked_image, batch, height, width, dtype, generator):
        """The mask at latent resolution and the masked image's latents (None without a masked image), batched
        and, with guidance, twice over."""
        f = self.vae_scale_factor
        mask = F.interpolate(mask, size=(height // f, width // f)).to(device=self.device, dtype=dtype)
        mask = repeat_to_batch(mask, batch, "mask")
        cfg = self.do_classifier_free_guidance
        masked_image_latents = None
        if masked_image is not None:
            if masked_image.shape[1] == self.vae.config.latent_channels:
                masked_image_latents = masked_image
            else:
                masked_image_latents = self.encode_image(masked_image.to(device=self.device, dtype=dtype),
                                                         generator, dtype, normalize=False)
            masked_image_latents = repeat_to_batch(masked_image_latents, batch, "masked image")
            masked_image_latents = torch.cat([masked_image_latents] * 2) if cfg else masked_image_latents
            masked_image_latents = masked_image_latents.to(device=self.device, dtype=dtype)
        return (torch.cat([mask] * 2) if cfg else mask), masked_image_latents

    # -- the call ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None, image=None,
                 mask_image=None, masked_image_latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, padding_mask_crop: int | None = None, strength: float = 0.9999,
                 num_inference_steps: int = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 guidance_rescale: float = 0.0, original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] = (0, 0),
                 negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(), callback=None,
                 callback_steps: int | None = None):
        height, width = self.default_height_width(height, width)
        self.check_size(height, width)
        # The SD v1 inpainting checks (strength, image and mask given, padding_mask_crop's needs, UNet channels).
        StableDiffusionInpaintPipeline.check_inpaint_inputs(self, image, mask_image, strength, output_type,
                                                            padding_mask_crop)
        check_denoising_range(denoising_start, denoising_end)
        self.check_sdxl_prompt_inputs(prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                                      negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                      num_images_per_prompt, output_type)
        batch = self.batch_size_of(prompt, prompt_embeds) * num_images_per_prompt
        device = self.device

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             guidance_rescale=guidance_rescale, clip_skip=clip_skip, denoising_end=denoising_end,
                             denoising_start=denoising_start, cross_attention_kwargs=cross_attention_kwargs) as call:
            call.hook.on_call_start(pipe=self, call=call)
            embeds = self.encode_prompt(prompt, prompt_2, device, num_images_per_prompt,
                                        self.do_classifier_free_guidance, negative_prompt, negative_prompt_2,
                                        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                        negative_pooled_prompt_embeds, clip_skip)
            dtype = embeds[0].dtype
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                                timesteps, sigmas)
            timesteps, num_inference_steps = self.schedule_from(num_inference_steps, strength, denoising_start)
            check_strength_steps(strength, num_inference_steps,
                                 denoising_start if is_fraction(denoising_start) else None)

            if padding_mask_crop is not None:
                crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
                resize_mode = "fill"
            else:
                crops_coords, resize_mode = None, "default"
            original_image = image
            init_image = self.image_processor.preprocess(image, height=height, width=width,
                                                         crops_coords=crops_coords, resize_mode=resize_mode)
            init_image = init_image.to(dtype=torch.float32)
            mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width,
                                                            resize_mode=resize_mode, crops_coords=crops_coords)
            if masked_image_latents is not None:
                masked_image = masked_image_latents
            elif init_image.shape[1] == self.vae.config.latent_channels:
                masked_image = None  # latents from another pipeline: there are no pixels to black out
            else:
                StableDiffusionInpaintPipeline.check_mask_matches(init_image, mask_condition)
                masked_image = init_image * (mask_condition < 0.5)

            plain_unet = self.unet.config.in_channels == 4
            latents, noise, image_latents = self.prepare_inpaint_latents(
                batch, height, width, dtype, generator, latents, init_image, timesteps[:1].repeat(batch),
                is_strength_max=strength == 1.0, add_noise=denoising_start is None, need_image_latents=plain_unet)
            mask, masked_image_latents = self.prepare_mask_latents(mask_condition, masked_image, batch, height,
                                                                   width, dtype, generator)
            if not plain_unet:
                if masked_image_latents is None:
                    raise ValueError("an inpainting UNet needs the masked image: pass image= as pixels, or "
                                     "masked_image_latents= with latents")
                seen = latents.shape[1] + mask.shape[1] + masked_image_latents.shape[1]
                if seen != self.unet.config.in_channels:
                    raise ValueError(
                        f"the UNet takes {self.unet.config.in_channels} input channels, but latents "
                        f"({latents.shape[1]}) + mask ({mask.shape[1]}) + masked image latents "
                        f"({masked_image_latents.shape[1]}) make {seen}; check mask_image and masked_image_latents")
            call.tensors.update(mask=mask, masked_image_latents=masked_image_latents)
            self.configure_steps(call, generator, eta, batch, latents.dtype)

            height, width = (s * self.vae_scale_factor for s in latents.shape[-2:])
            original_size = original_size or (height, width)
            target_size = target_size or (height, width)
            add_time_ids, negative_add_time_ids = self.micro_conditioning(
                original_size, crops_coords_top_left, target_size, aesthetic_score, negative_aesthetic_score,
                negative_original_size or original_size, negative_crops_coords_top_left,
                negative_target_size or target_size, dtype, self.text_encoder_projection_dim(embeds[2]))
            self.publish_conditioning(call, embeds, add_time_ids, negative_add_time_ids, batch)

            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
            timesteps = cut_at_denoising_end(self.scheduler, timesteps, denoising_end)
            call.settings.update(image_latents=image_latents, noise=noise, timesteps=timesteps)
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            paste_back = None
            if padding_mask_crop is not None:
                paste_back = lambda images: [  # noqa: E731
                    self.image_processor.apply_overlay(mask_image, original_image, im, crops_coords) for im in images]
            return self.finish_sdxl_call(call, latents, output_type, return_dict, paste_back)
