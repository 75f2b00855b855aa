"""CLIP-guided Stable Diffusion: steer sampling toward images that a CLIP model matches with the prompt.

After Katherine Crowson's CLIP guidance and Jack000's glid-3-xl. Every step, besides the usual (classifier-free
guided) noise prediction, the pipeline estimates the clean image from the current latents, decodes it with the
VAE and embeds it with CLIP's image tower (whole, or as random square cutouts). The loss is the squared
great-circle distance between that embedding and CLIP's embedding of the prompt; its gradient with respect to
the latents, taken through the VAE decoder and the UNet, corrects the step:

* schedulers parameterised by alpha-bar (DDIM, PNDM, DPM-Solver...): the noise prediction moves by
  ``sqrt(1 - alpha_bar_t) * dloss/dlatents``, which moves the predicted clean image down the loss;
* schedulers parameterised by sigma (Euler, LMS, Heun...): the latents move by ``-sigma_t**2 * dloss/dlatents``
  before the step, as a score correction in k-diffusion's formulation.

Components: the Stable Diffusion ones (vae, text_encoder, tokenizer, unet, scheduler) plus ``clip_model`` (a
transformers ``CLIPModel``) and ``feature_extractor`` (its ``CLIPImageProcessor``, for the pixel statistics).
The CLIP model shares the SD tokenizer, as in the original community pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffloom import DiffusionPipeline, VaeImageProcessor, randn_tensor
from diffloom.images import OUTPUT_TYPES
from diffloom_pipelines.stable_diffusion import StableDiffusionPipelineOutput, step_kwargs_for


def spherical_dist_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Half the squared angle between ``x`` and ``y``: ``2 * arcsin(|x^ - y^| / 2) ** 2`` on unit vectors."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return 2 * torch.arcsin((x - y).norm(dim=-1) / 2) ** 2


def make_cutouts(images: torch.Tensor, cut_size: int, num_cutouts: int, generator=None) -> torch.Tensor:
    """``num_cutouts`` random squares (the same for every image of the batch), each average-pooled to
    ``cut_size``; (num_cutouts * B, C, cut_size, cut_size), cutout-major."""
    height, width = images.shape[2:]
    max_size = min(height, width)
    min_size = min(height, width, cut_size)
    pieces = []
    for _ in range(num_cutouts):
        size = int(torch.rand([], generator=generator) * (max_size - min_size) + min_size)
        x = int(torch.randint(0, width - size + 1, (), generator=generator))
        y = int(torch.randint(0, height - size + 1, (), generator=generator))
        pieces.append(F.adaptive_avg_pool2d(images[:, :, y:y + size, x:x + size], cut_size))
    return torch.cat(pieces)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor.
    return output if torch.is_tensor(output) else output.pooler_output


class CLIPGuidedStableDiffusion(DiffusionPipeline):
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, vae, text_encoder, clip_model, tokenizer, unet, scheduler, feature_extractor):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, clip_model=clip_model, tokenizer=tokenizer,
                              unet=unet, scheduler=scheduler, feature_extractor=feature_extractor)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5, clip_guidance_scale: float = 100.0,
                 clip_prompt: str | list[str] | None = None, num_cutouts: int = 4, use_cutouts: bool = True,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=()):
        """Generate images for ``prompt``; ``clip_guidance_scale`` weighs the CLIP loss (0 turns it off),
        ``clip_prompt`` is the text CLIP compares with (default: the prompt), ``num_cutouts`` the random crops
        CLIP sees per step when ``use_cutouts`` (otherwise the whole image, resized)."""
        batch = self._check(prompt, clip_prompt, num_cutouts, output_type)
        size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or size, width or size
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be divisible by {self.vae_scale_factor}, got {height}x{width}")

        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_guidance_scale=clip_guidance_scale, num_cutouts=num_cutouts,
                             use_cutouts=use_cutouts, generator=generator,
                             extra_step_kwargs=step_kwargs_for(self.scheduler, generator, 0.0)) as call:
            call.hook.on_call_start(pipe=self, call=call)
            prompt_ids = self._token_ids(prompt)
            prompt_embeds = self.text_encoder(prompt_ids)[0]
            if self.do_classifier_free_guidance:
                # Unconditional first: the order diffusers hands the batch to callbacks.
                empty = self.text_encoder(self._token_ids([""] * batch))[0]
                prompt_embeds = torch.cat([empty, prompt_embeds])
            call.tensors["prompt_embeds"] = prompt_embeds
            if clip_guidance_scale > 0:
                clip_ids = self._token_ids(clip_prompt) if clip_prompt is not None else prompt_ids
                call.settings["clip_text_features"] = F.normalize(
                    _features(self.clip_model.get_text_features(input_ids=clip_ids)), dim=-1)

            shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor,
                     width // self.vae_scale_factor)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=self.device, dtype=prompt_embeds.dtype)
            elif tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {shape}")
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            latents = self.denoise(call, latents.to(self.device) * self.scheduler.init_noise_sigma,
                                   self.scheduler.timesteps)

            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            image = call.fire_after_decode(image)
            images = self.image_processor.postprocess(image, output_type=output_type)
            output = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict \
                else (images, None)
            call.hook.on_call_end(pipe=self, call=call, output=output)
            return output

    # -- the denoising steps -----------------------------------------------------------------------------------

    def prepare_model_input(self, call, step):
        latents = torch.cat([step.latents] * 2) if self.do_classifier_free_guidance else step.latents
        step.model_input = self.scheduler.scale_model_input(latents, step.timestep)
        step.model_timestep = step.timestep
        step.conditioning = {"encoder_hidden_states": call.tensors["prompt_embeds"]}

    def run_denoiser(self, call, step):
        return self.unet(step.model_input, step.model_timestep, **step.conditioning).sample

    def guide(self, call, step):
        if not self.do_classifier_free_guidance:
            return step.model_output
        uncond, text = step.model_output.chunk(2)
        return uncond + call.guidance_scale * (text - uncond)

    def scheduler_step(self, call, step):
        noise_pred, latents = step.noise_pred, step.latents
        if call.settings["clip_guidance_scale"] > 0:
            noise_pred, latents = self.clip_guided(call, step)
        kwargs = call.settings["extra_step_kwargs"]
        return self.scheduler.step(noise_pred, step.timestep, latents, **kwargs, return_dict=False)[0]

    # -- CLIP guidance -----------------------------------------------------------------------------------------

    def _sigma_parameterised(self) -> bool:
        # Schedulers in k-diffusion's formulation start from noise of standard deviation sigma_max > 1.
        return float(self.scheduler.init_noise_sigma) != 1.0

    @torch.enable_grad()
    def clip_guided(self, call, step) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise prediction and latents of this step, corrected by the CLIP loss gradient."""
        latents = step.latents.detach().requires_grad_()
        embeds = call.tensors["prompt_embeds"]
        text_embeds = embeds.chunk(2)[1] if self.do_classifier_free_guidance else embeds
        if self._sigma_parameterised():
            sigma = self.scheduler.sigmas[step.index].to(latents.device, latents.dtype)
            eps = self.unet(latents / (sigma**2 + 1) ** 0.5, step.timestep, encoder_hidden_states=text_embeds).sample
            estimate = latents - sigma * eps
        else:
            if not hasattr(self.scheduler, "alphas_cumprod"):
                raise ValueError(f"CLIP guidance needs a scheduler with alphas_cumprod or sigmas; "
                                 f"{type(self.scheduler).__name__} has neither")
            alpha_bar = self.scheduler.alphas_cumprod[int(step.timestep)].to(latents.device, latents.dtype)
            beta = 1 - alpha_bar
            eps = self.unet(latents, step.timestep, encoder_hidden_states=text_embeds).sample
            x0 = (latents - beta.sqrt() * eps) / alpha_bar.sqrt()
            # glid-3-xl decodes a blend: mostly the noisy latents early (x0 is a poor guess there), x0 late.
            estimate = x0 * beta.sqrt() + latents * (1 - beta.sqrt())
        image = self.vae.decode(estimate / self.vae.config.scaling_factor).sample
        loss = self.clip_loss(call, (image / 2 + 0.5).clamp(0, 1)) * call.settings["clip_guidance_scale"]
        grad = torch.autograd.grad(loss, latents)[0]
        if self._sigma_parameterised():
            return step.noise_pred, (latents - sigma**2 * grad).detach()
        return step.noise_pred + beta.sqrt() * grad, step.latents

    def clip_loss(self, call, images: torch.Tensor) -> torch.Tensor:
        """Summed over the batch (each image's gradient is that of its own loss), averaged over cutouts."""
        cut = self.clip_model.config.vision_config.image_size
        if call.settings["use_cutouts"]:
            generator = call.settings["generator"]
            generator = generator[0] if isinstance(generator, (list, tuple)) else generator
            pixels = make_cutouts(images, cut, call.settings["num_cutouts"], generator)
        else:
            pixels = F.interpolate(images, size=(cut, cut), mode="bilinear", align_corners=False)
        mean = torch.tensor(self.feature_extractor.image_mean, device=pixels.device, dtype=pixels.dtype)
        std = torch.tensor(self.feature_extractor.image_std, device=pixels.device, dtype=pixels.dtype)
        pixels = (pixels - mean[:, None, None]) / std[:, None, None]
        features = _features(self.clip_model.get_image_features(pixel_values=pixels))
        features = features.view(-1, images.shape[0], features.shape[-1])  # (cutouts, batch, dim)
        return spherical_dist_loss(features, call.settings["clip_text_features"][None]).mean(0).sum()

    # -- pieces ------------------------------------------------------------------------------------------------

    def _token_ids(self, text) -> torch.Tensor:
        return self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    @staticmethod
    def _check(prompt, clip_prompt, num_cutouts, output_type) -> int:
        if not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, not {type(prompt).__name__}")
        batch = 1 if isinstance(prompt, str) else len(prompt)
        if isinstance(clip_prompt, list) and len(clip_prompt) not in (1, batch):
            raise ValueError(f"clip_prompt has {len(clip_prompt)} entries for {batch} prompts; pass one per prompt "
                             f"or a single string")
        if not isinstance(num_cutouts, int) or num_cutouts < 1:
            raise ValueError(f"num_cutouts must be a positive int, got {num_cutouts!r}")
        if output_type not in OUTPUT_TYPES or output_type == "latent":
            raise ValueError(f"output_type={output_type!r} is not one of pil, np, pt")
        return batch
