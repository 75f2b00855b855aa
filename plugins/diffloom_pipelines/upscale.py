"""Super-resolution with Stable Diffusion: the x4 pixel upscaler and the x2 latent upscaler.

The x4 upscaler is a diffusion model over the latents of a VAE that upsamples 4x: its UNet reads the noisy
latents concatenated with the low-resolution image itself, which is first noised to ``noise_level`` by a
separate ``low_res_scheduler`` (noise augmentation, Ho et al. 2021, "Cascaded Diffusion Models"); the level is
given to the UNet as a class label.

The x2 latent upscaler (Katherine Crowson's) works on SD latents: its UNet reads the noisy latents next to the
low-resolution latents upsampled 2x (nearest), is conditioned on the pooled text embedding through
``timestep_cond`` and on ``log(sigma) / 4`` as its timestep, and predicts a denoised sample in the
k-diffusion "c_skip / c_out" parametrisation, which is turned back into the noise prediction the Euler
scheduler steps with. It takes the latents of another pipeline (``output_type="latent"``) or an image.
"""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffloom.callbacks import step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.loop import CallState, StepState
from diffloom.pipeline import DiffusionPipeline, ImagePipelineOutput
from diffloom.randomness import randn_tensor

from .sdxl import vae_in_float32
from .stable_diffusion import (StableDiffusionPipelineBase, check_generators, negative_prompts, retrieve_latents,
                               tokenize, warn_truncation)

logger = logging.getLogger(__name__)

# The x4 upscaler's VAE scales its latents by 1/12; configs written before that was recorded say otherwise.
X4_VAE_SCALING_FACTOR = 0.08333


def check_image_batch(image, prompt_batch: int, arrays_are_batches: bool = False):
    """One low-resolution image per prompt.

    A list counts its entries and a 4-D tensor its first axis. With ``arrays_are_batches`` (the x4 upscaler, as
    in diffusers) any tensor or numpy array counts its first axis, so a 3-D one is read as a batch.
    """
    if isinstance(image, list):
        count = len(image)
    elif arrays_are_batches and isinstance(image, (torch.Tensor, np.ndarray)):
        count = image.shape[0]
    elif torch.is_tensor(image):
        count = image.shape[0] if image.ndim == 4 else 1
    elif arrays_are_batches and isinstance(image, PIL.Image.Image):
        count = 1
    else:
        return
    if count != prompt_batch:
        hint = ""
        if arrays_are_batches and not isinstance(image, (list, PIL.Image.Image)) and image.ndim == 3:
            hint = " (a 3-D tensor or array is read as a batch along its first axis: pass image[None])"
        raise ValueError(f"image has {count} images for {prompt_batch} prompts{hint}; pass one image per prompt")


class StableDiffusionUpscalePipeline(StableDiffusionPipelineBase):
    """Text-guided 4x super-resolution (stable-diffusion-x4-upscaler)."""

    _optional_components = ["watermarker", "safety_checker", "feature_extractor"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, vae, text_encoder, tokenizer, unet, low_res_scheduler, scheduler, safety_checker=None,
                 feature_extractor=None, watermarker=None, max_noise_level: int = 350):
        # Not the SD v1 constructor: this pipeline corrects no scheduler or UNet settings, has a second
        # scheduler and no requires_safety_checker flag.
        DiffusionPipeline.__init__(self)
        if watermarker is not None:
            raise ValueError("watermarker: diffloom does not apply invisible watermarks; pass watermarker=None")
        if vae is not None and vae.config.get("scaling_factor") != X4_VAE_SCALING_FACTOR:
            logger.warning("the VAE config has scaling_factor=%s, but the x4 upscaler's VAE uses %s; it is used "
                           "with %s (update vae/config.json to silence this warning)",
                           vae.config.get("scaling_factor"), X4_VAE_SCALING_FACTOR, X4_VAE_SCALING_FACTOR)
            vae.register_to_config(scaling_factor=X4_VAE_SCALING_FACTOR)
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(f"{type(self).__name__} got a safety_checker but no feature_extractor to prepare its "
                             f"input; pass feature_extractor=CLIPImageProcessor(...), or safety_checker=None")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              low_res_scheduler=low_res_scheduler, scheduler=scheduler,
                              safety_checker=safety_checker, watermarker=watermarker,
                              feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")
        self.register_to_config(max_noise_level=max_noise_level)

    def prepare_model_input(self, call: CallState, step: StepState):
        super().prepare_model_input(call, step)
        step.model_input = torch.cat([step.model_input, call.tensors["image"]], dim=1)
        step.conditioning["class_labels"] = call.tensors["noise_level"]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, num_inference_steps: int = 75,
                 guidance_scale: float = 9.0, noise_level: int = 20, negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback=None, callback_steps: int = 1,
                 cross_attention_kwargs: dict | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=()):
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image= (the low-resolution image to upscale)")
        prompt_batch = self.batch_size_of(prompt, prompt_embeds)
        check_image_batch(image, prompt_batch, arrays_are_batches=True)
        if noise_level > self.config.max_noise_level:
            raise ValueError(f"noise_level={noise_level} exceeds this upscaler's max_noise_level="
                             f"{self.config.max_noise_level}; pass a lower noise_level")
        batch = prompt_batch * num_images_per_prompt
        check_generators(generator, batch)
        device = self.device

        hooks = [*hooks, *step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, cross_attention_kwargs=cross_attention_kwargs) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            image = self.image_processor.preprocess(image).to(dtype=dtype, device=device)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps
            # Noise augmentation: the UNet was trained on low-resolution images noised to a known level.
            level = torch.tensor([noise_level], dtype=torch.long, device=device)
            # One draw per low-resolution image: a list of generators (one per output image) lends its first ones.
            noise_generator = generator[:image.shape[0]] if isinstance(generator, list) else generator
            noise = randn_tensor(image.shape, generator=noise_generator, device=device, dtype=dtype)
            image = self.low_res_scheduler.add_noise(image, noise, level)
            # The whole image batch is repeated num_images_per_prompt times (and twice over with guidance) while
            # the prompts repeat each entry in place: with several images and prompts, output k reads image
            # k % len(images). diffusers pairs them so, and its images are the reference.
            image = torch.cat([image] * (2 if self.do_classifier_free_guidance else 1) * num_images_per_prompt)
            call.tensors.update(image=image, noise_level=torch.cat([level] * image.shape[0]))

            height, width = image.shape[2:]
            latents = self.prepare_latents(batch, self.vae.config.latent_channels, height * self.vae_scale_factor,
                                           width * self.vae_scale_factor, dtype, device, generator, latents)
            seen = latents.shape[1] + image.shape[1]
            if seen != self.unet.config.in_channels:
                raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels, but latents "
                                 f"({latents.shape[1]}) + image ({image.shape[1]}) make {seen}; check the UNet and "
                                 f"image")
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)

            nsfw = None
            if output_type == "latent":
                images = latents
            else:
                with vae_in_float32(self.vae):
                    decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor,
                                              return_dict=False)[0]
                decoded = call.fire_after_decode(decoded)
                decoded, nsfw = self.run_safety_checker(decoded, device, dtype)
                denormalize = [True] * decoded.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
                images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                          do_denormalize=denormalize)
            return self.finish_call(call, images, nsfw, return_dict)


class StableDiffusionLatentUpscalePipeline(StableDiffusionPipelineBase):
    """Text-guided 2x super-resolution in Stable Diffusion's latent space (sd-x2-latent-upscaler)."""

    _optional_components: list[str] = []
    _callback_tensor_inputs = ["latents"]
    # Its guidance blends in the step's latents at the step's sigma.
    denoiser_components = ()

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        # Not the SD v1 constructor: no safety checker, no corrected settings.
        DiffusionPipeline.__init__(self)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, resample="bicubic")

    def _encode(self, texts, max_length, device):
        input_ids = tokenize(self.tokenizer, texts, max_length).input_ids
        output = self.text_encoder(input_ids.to(device), output_hidden_states=True)
        # The last layer's hidden states, before the final layer norm, and the pooled output.
        return output.hidden_states[-1], output.pooler_output

    def encode_prompt(self, prompt, device, do_classifier_free_guidance, negative_prompt=None, prompt_embeds=None,
                      negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None):
        """``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``
        (negatives are None without guidance)."""
        batch_size = self.batch_size_of(prompt, prompt_embeds)
        if prompt_embeds is None or pooled_prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else prompt
            input_ids = tokenize(self.tokenizer, texts, self.tokenizer.model_max_length).input_ids
            warn_truncation(self.tokenizer, texts, input_ids)
            prompt_embeds, pooled_prompt_embeds = self._encode(texts, self.tokenizer.model_max_length, device)
        if do_classifier_free_guidance and (negative_prompt_embeds is None or negative_pooled_prompt_embeds is None):
            uncond = negative_prompts(prompt, negative_prompt, batch_size)
            negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode(uncond, prompt_embeds.shape[1],
                                                                                 device)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # -- the denoising steps -----------------------------------------------------------------------------------

    def _sigma(self, step: StepState):
        return self.scheduler.sigmas[step.index]

    def prepare_model_input(self, call: CallState, step: StepState):
        latents = step.latents
        model_input = torch.cat([latents] * 2) if call.settings["cfg"] else latents
        scaled = self.scheduler.scale_model_input(model_input, step.timestep)
        step.model_input = torch.cat([scaled, call.tensors["image_cond"]], dim=1)
        step.model_timestep = torch.log(self._sigma(step)) * 0.25
        step.conditioning = {"encoder_hidden_states": call.tensors["prompt_embeds"],
                             "timestep_cond": call.tensors["timestep_cond"]}

    def run_denoiser(self, call: CallState, step: StepState):
        # The last output channel is a variance estimate the sampler does not use.
        return self.unet(step.model_input, step.model_timestep, **step.conditioning, return_dict=False)[0][:, :-1]

    def guide(self, call: CallState, step: StepState):
        # The UNet predicts c_out-scaled denoised samples: blend in the input (c_skip = 1 / (sigma^2 + 1)),
        # scaled by c_out = sigma / sqrt(sigma^2 + 1).
        sigma = self._sigma(step)
        model_input = torch.cat([step.latents] * 2) if call.settings["cfg"] else step.latents
        pred = model_input / (sigma**2 + 1) + self.scheduler.scale_model_input(sigma, step.timestep) * step.model_output
        if not call.settings["cfg"]:
            return pred
        uncond, text = pred.chunk(2)
        return uncond + call.guidance_scale * (text - uncond)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, num_inference_steps: int = 75,
                 guidance_scale: float = 9.0, negative_prompt: str | list[str] | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback=None, callback_steps: int = 1, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=()):
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, 1, output_type)
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (from the same text encoder)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image= (latents from output_type='latent', or an image)")
        batch = self.batch_size_of(prompt, prompt_embeds)
        check_image_batch(image, batch)
        device = self.device
        # Guidance is decided once for the whole call, as the UNet batch is laid out once.
        cfg = guidance_scale > 1.0
        if guidance_scale == 0:
            prompt = [""] * batch

        hooks = [*hooks, *step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, cfg=cfg) as call:
            call.hook.on_call_start(pipe=self, call=call)
            prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = self.encode_prompt(
                prompt, device, cfg, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                negative_pooled_prompt_embeds)
            if cfg:
                prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
                pooled = torch.cat([negative_pooled, pooled])
            dtype = prompt_embeds.dtype

            image = self.image_processor.preprocess(image).to(dtype=dtype, device=device)
            if image.shape[1] == 3:
                image = retrieve_latents(self.vae.encode(image), generator=generator) * self.vae.config.scaling_factor
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps
            low_res = torch.cat([image] * (2 if cfg else 1))
            # At noise level 0 the low-resolution latents enter unscaled (1 / sqrt(0^2 + 1)).
            image_cond = F.interpolate(low_res, scale_factor=2, mode="nearest").to(dtype)
            # The noise level (0) is embedded as 64 ones and 64 zeros next to the pooled text embedding.
            noise_level_embed = torch.cat([torch.ones(pooled.shape[0], 64, dtype=pooled.dtype, device=device),
                                           torch.zeros(pooled.shape[0], 64, dtype=pooled.dtype, device=device)], 1)
            call.tensors.update(prompt_embeds=prompt_embeds, image_cond=image_cond,
                                timestep_cond=torch.cat([noise_level_embed, pooled], dim=1))

            height, width = image.shape[2:]
            channels = self.vae.config.latent_channels
            latents = self.prepare_latents(batch, channels, height * 2 * self.vae_scale_factor,
                                           width * 2 * self.vae_scale_factor, dtype, device, generator, latents)
            if channels + image.shape[1] != self.unet.config.in_channels:
                raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels, but latents "
                                 f"({channels}) + low-resolution latents ({image.shape[1]}) make "
                                 f"{channels + image.shape[1]}; check the UNet and image")
            latents = self.denoise(call, latents, timesteps, 0)

            if output_type == "latent":
                images = latents
            else:
                decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
                images = self.image_processor.postprocess(call.fire_after_decode(decoded), output_type=output_type)
            output = ImagePipelineOutput(images=images) if return_dict else (images,)
            call.hook.on_call_end(pipe=self, call=call, output=output)
            return output
