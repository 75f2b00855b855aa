"""Stable Diffusion depth-to-image (stable-diffusion-2-depth): image-to-image that keeps the scene's geometry.

The UNet reads, next to the noisy latents, a depth map of the input image at latent resolution, normalised to
[-1, 1] per image. The map comes from a monocular depth estimator (DPT, Ranftl et al. 2021, through
transformers) or is given as ``depth_map``. The rest is SDEdit, as in ``img2img.py``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.loop import CallState, StepState
from diffloom.pipeline import DiffusionPipeline, ImagePipelineOutput

from .img2img import StableDiffusionImg2ImgPipeline, check_strength_steps, strength_timesteps


class StableDiffusionDepth2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """Text-guided, depth-preserving image-to-image generation."""

    _optional_components = ["depth_estimator", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "depth_mask"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, depth_estimator, feature_extractor):
        # Not the SD v1 constructor: no safety checker, and the scheduler's settings are taken as they are.
        DiffusionPipeline.__init__(self)
        if unet is not None:
            self._fix_unet_config(unet)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, depth_estimator=depth_estimator,
                              feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def prepare_depth_map(self, image, depth_map, batch_size, do_classifier_free_guidance, dtype, device):
        """The depth map at latent resolution in [-1, 1], one per image in the batch (twice over with guidance).

        Estimated from ``image`` unless ``depth_map`` (batch x height x width, any scale) is given.
        """
        images = list(image) if isinstance(image, (list, tuple)) or (torch.is_tensor(image) and image.ndim == 4) \
            else [image]
        first = images[0]
        if isinstance(first, PIL.Image.Image):
            width, height = first.size
        elif isinstance(first, np.ndarray):
            height, width = first.shape[:2] if first.ndim == 3 else first.shape[-2:]
        else:
            height, width = first.shape[-2:]
        if depth_map is None:
            if self.depth_estimator is None or self.feature_extractor is None:
                raise ValueError(f"{type(self).__name__} has no depth_estimator/feature_extractor; pass depth_map= "
                                 f"or build the pipeline with a DPTForDepthEstimation and its DPTImageProcessor")
            pixel_values = self.feature_extractor(images=images, return_tensors="pt").pixel_values
            pixel_values = pixel_values.to(device=device, dtype=dtype)
            # Half-precision pipelines run the estimator (whose batch norms need it) under autocast.
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                depth_map = self.depth_estimator(pixel_values).predicted_depth
        else:
            depth_map = depth_map.to(device=device, dtype=dtype)
        f = self.vae_scale_factor
        depth_map = F.interpolate(depth_map.unsqueeze(1), size=(height // f, width // f), mode="bicubic",
                                  align_corners=False)
        low = torch.amin(depth_map, dim=[1, 2, 3], keepdim=True)
        high = torch.amax(depth_map, dim=[1, 2, 3], keepdim=True)
        depth_map = (2.0 * (depth_map - low) / (high - low) - 1.0).to(dtype)
        if depth_map.shape[0] < batch_size:
            depth_map = depth_map.repeat(batch_size // depth_map.shape[0], 1, 1, 1)
        return torch.cat([depth_map] * 2) if do_classifier_free_guidance else depth_map

    def prepare_model_input(self, call: CallState, step: StepState):
        super().prepare_model_input(call, step)
        step.model_input = torch.cat([step.model_input, call.tensors["depth_mask"]], dim=1)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, depth_map: torch.Tensor | None = None,
                 strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(), callback=None,
                 callback_steps: int | None = None):
        self.check_strength(strength)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs an image= to start from")
        batch_size = self.batch_size_of(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
        device = self.device

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            call.tensors["depth_mask"] = self.prepare_depth_map(image, depth_map, batch,
                                                                self.do_classifier_free_guidance, dtype, device)
            image = self.image_processor.preprocess(image)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength)
            # As in diffusers, PNDM's extra final timestep still runs when strength keeps no whole step.
            check_strength_steps(strength, len(timesteps))
            latents = self.prepare_latents(image, timesteps[:1].repeat(batch), batch_size, num_images_per_prompt,
                                           dtype, device, generator)
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            if output_type == "latent":
                images = latents
            else:
                decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
                images = self.image_processor.postprocess(call.fire_after_decode(decoded), output_type=output_type)
            output = ImagePipelineOutput(images=images) if return_dict else (images,)
            call.hook.on_call_end(pipe=self, call=call, output=output)
            return output
