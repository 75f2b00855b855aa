"""Stable Diffusion text-to-image, and the machinery its image-to-image and inpainting siblings share.

A call encodes the prompt with CLIP, draws the starting latents, and runs the core denoising loop with four
overridden steps: the model input (the latents twice over when classifier-free guidance is on), the UNet, the
guidance rule (``uncond + scale * (text - uncond)``, optionally rescaled), and the scheduler step. Everything
a step reads that a callback may replace (``prompt_embeds``...) is read from ``call.tensors`` every step, and
whether guidance is on is decided every step from the call's guidance scale, so a callback that drops the
unconditional half and sets ``pipe._guidance_scale = 0.0`` turns guidance off from the next step on.
"""

from __future__ import annotations

import inspect
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import OUTPUT_TYPES, VaeImageProcessor
from diffloom.loop import CallState, StepState
from diffloom.outputs import BaseOutput
from diffloom.pipeline import DiffusionPipeline
from diffloom.randomness import randn_tensor

logger = logging.getLogger(__name__)

# A fast tokenizer sets its padding/truncation mode on the shared Rust object before each call, so two threads
# tokenizing with different modes could see each other's: calls through one pipeline are serialised.
_TOKENIZER_LOCK = threading.Lock()


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    images: Any = None
    nsfw_content_detected: list[bool] | None = None


# -- helpers shared with other pipelines -----------------------------------------------------------------------


def rescale_noise_cfg(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float = 0.0):
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4).

    A large guidance scale inflates the prediction's standard deviation and overexposes images; bring it back
    to that of the text-conditioned prediction, and blend by ``guidance_rescale``.
    """
    dims = list(range(1, noise_pred_text.ndim))
    rescaled = noise_cfg * (noise_pred_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def retrieve_timesteps(scheduler, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs):
    """Set the scheduler's timesteps from a step count, or from custom ``timesteps`` or ``sigmas``.

    Returns ``(timesteps, num_inference_steps)``; with a custom schedule the count is its length.
    """
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass timesteps or sigmas, not both: each one defines the whole schedule")
    custom = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas} if sigmas is not None else {}
    if custom:
        (name,) = custom
        if name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__}.set_timesteps takes no custom {name}; use a scheduler "
                             f"that does, or pass num_inference_steps instead")
        scheduler.set_timesteps(device=device, **custom, **kwargs)
        return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
    return scheduler.timesteps, num_inference_steps


def retrieve_latents(encoder_output, generator=None, sample_mode: str = "sample") -> torch.Tensor:
    """Latents out of a VAE's ``encode`` output: a draw from its distribution, its mode, or plain latents."""
    if hasattr(encoder_output, "latent_dist"):
        if sample_mode == "sample":
            return encoder_output.latent_dist.sample(generator)
        if sample_mode == "argmax":
            return encoder_output.latent_dist.mode()
    if hasattr(encoder_output, "latents"):
        return encoder_output.latents
    raise AttributeError(f"cannot read latents from the VAE's encode output ({type(encoder_output).__name__})")


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales, for UNets distilled with the scale as an input (LCM).

    The same construction as a timestep embedding (VDM's), applied to ``1000 * w``.
    """
    if w.ndim != 1:
        raise ValueError(f"guidance_scale_embedding takes a 1-D tensor of scales, got shape {tuple(w.shape)}")
    w = w * 1000.0
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step)
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def step_kwargs_for(scheduler, generator, eta) -> dict:
    """``eta`` and ``generator`` for schedulers whose ``step`` takes them (DDIM's eta, ancestral noise)."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def negative_prompts(prompt, negative_prompt, batch_size: int) -> list[str]:
    """One negative prompt per prompt: the empty prompt by default, a single string repeated, or a list of the
    prompt's length."""
    if negative_prompt is None:
        return [""] * batch_size
    if prompt is not None and type(prompt) is not type(negative_prompt):
        raise TypeError(f"negative_prompt must be of the same type as prompt ({type(prompt).__name__}), "
                        f"got {type(negative_prompt).__name__}")
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch_size
    if len(negative_prompt) != batch_size:
        raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch_size}; "
                         f"pass one negative prompt per prompt (or a single string for all)")
    return list(negative_prompt)


def tokenize(tokenizer, texts, max_length: int):
    """Token ids of ``texts`` padded and truncated to ``max_length`` (the tokenizer's full output)."""
    with _TOKENIZER_LOCK:
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def warn_truncation(tokenizer, prompt, input_ids):
    """Log the part of ``prompt`` that did not fit the text encoder's window."""
    with _TOKENIZER_LOCK:
        full = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] >= input_ids.shape[-1] and not torch.equal(full, input_ids):
        window = tokenizer.model_max_length
        dropped = tokenizer.batch_decode(full[:, window - 1:-1])
        logger.warning("the text encoder reads at most %d tokens, so this part of the prompt was dropped: %s",
                       window, dropped)


def _version_tuple(version: str) -> tuple[int, ...]:
    """"0.8.0.dev0" -> (0, 8, 0): the release numbers, pre-release tags ignored."""
    return tuple(int(re.match(r"\d*", piece).group() or 0) for piece in str(version).split(".")[:3])


# -- the shared base ---------------------------------------------------------------------------------------------


class StableDiffusionPipelineBase(DiffusionPipeline):
    """Components, prompt encoding, the denoising steps, decoding and the safety check of the SD v1/v2 family."""

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    denoiser_components = ("unet",)
    # Outdated scheduler settings that diffusers corrects when the pipeline is built: key -> corrected value.
    _scheduler_fixes = {"steps_offset": 1, "clip_sample": False}

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True):
        super().__init__()
        if scheduler is not None:
            self._fix_scheduler_config(scheduler)
        if unet is not None:
            self._fix_unet_config(unet)
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "%s runs without a safety checker (safety_checker=None). Respect the Stable Diffusion license "
                "and do not expose unfiltered results in public services; pass requires_safety_checker=False "
                "to silence this warning.", type(self).__name__)
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(f"{type(self).__name__} got a safety_checker but no feature_extractor to prepare its "
                             f"input; pass feature_extractor=CLIPImageProcessor(...), or safety_checker=None")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, safety_checker=safety_checker,
                              feature_extractor=feature_extractor, image_encoder=image_encoder)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    def _fix_scheduler_config(self, scheduler):
        for key, value in self._scheduler_fixes.items():
            current = scheduler.config.get(key, value)
            if current != value:
                logger.warning("%s's config has %s=%r, an outdated setting; it is used as %s=%r (update "
                               "scheduler/scheduler_config.json to silence this warning)",
                               type(scheduler).__name__, key, current, key, value)
                scheduler.register_to_config(**{key: value})

    @staticmethod
    def _fix_unet_config(unet):
        # UNets saved before diffusers 0.9 recorded sample_size 32 for the 64-latent SD v1 models.
        version = unet.config.get("_diffusers_version")
        size = unet.config.get("sample_size")
        if version is not None and isinstance(size, int) and size < 64 and _version_tuple(version) < (0, 9, 0):
            logger.warning("the UNet config (diffusers %s) has sample_size=%d, which old Stable Diffusion "
                           "checkpoints got wrong; it is used as 64 (update unet/config.json to silence this)",
                           version, size)
            unet.register_to_config(sample_size=64)

    # -- per-call properties -----------------------------------------------------------------------------------

    @property
    def do_classifier_free_guidance(self) -> bool:
        # UNets distilled with the guidance scale as an input (LCM) take it as an embedding instead.
        return self._call_state().guidance_scale > 1 and self.unet.config.get("time_cond_proj_dim") is None

    def default_height_width(self, height, width) -> tuple[int, int]:
        size = self.unet.config.sample_size
        size_h, size_w = (size, size) if isinstance(size, int) else size
        return (height or size_h * self.vae_scale_factor, width or size_w * self.vae_scale_factor)

    # -- argument checks ---------------------------------------------------------------------------------------

    def check_prompt_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                            num_images_per_prompt, output_type):
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both (prompt_embeds replaces the encoded prompt)")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt (str or list of str) or prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt must be a str or a list of str, not {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")

    def check_size(self, height, width):
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be divisible by {f} (the VAE's downsampling factor), got "
                             f"height={height}, width={width}; try {height - height % f}x{width - width % f}")

    @staticmethod
    def check_strength(strength):
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0.0, 1.0], got {strength}")

    @staticmethod
    def batch_size_of(prompt, prompt_embeds) -> int:
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

    # -- prompt encoding ---------------------------------------------------------------------------------------

    def _text_encoder_hidden_states(self, input_ids, attention_mask, clip_skip):
        encoder = self.text_encoder
        if clip_skip is None:
            return encoder(input_ids, attention_mask=attention_mask)[0]
        # clip_skip=1 takes the penultimate layer; the final layer norm is applied as it is to the last one.
        hidden = encoder(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model.
        return getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-(clip_skip + 1)])

    def _tokenize(self, texts, max_length, device):
        tokens = tokenize(self.tokenizer, texts, max_length)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        return tokens.input_ids, mask

    def _warn_truncation(self, prompt, input_ids):
        warn_truncation(self.tokenizer, prompt, input_ids)

    def maybe_convert_prompt(self, prompt, tokenizer):
        """The prompt as ``tokenizer`` should read it: adapters that add words (textual inversion's multi-vector
        tokens) may rewrite it through their own ``maybe_convert_prompt``; with none loaded it is unchanged.

        A tokenizer can arrive with words added already (a folder saved after loading an embedding): the adapter
        that loads such words is then brought in to spell them out, as diffusers always does."""
        if tokenizer is not None and set(tokenizer.added_tokens_encoder) - set(tokenizer.all_special_tokens):
            self._adapter_method("load_textual_inversion")
        for adapter in self.__dict__.get("_adapters", {}).values():
            convert = getattr(adapter, "maybe_convert_prompt", None)
            if convert is not None:
                prompt = convert(prompt, tokenizer)
        return prompt

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None):
        """``(prompt_embeds, negative_prompt_embeds)``, each repeated ``num_images_per_prompt`` times per prompt.

        The negative embeddings are computed only with guidance on (from ``negative_prompt``, or the empty
        prompt), padded to the same length as the prompt's.
        """
        batch_size = self.batch_size_of(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompt = self.maybe_convert_prompt(prompt, self.tokenizer)
            input_ids, mask = self._tokenize(prompt, self.tokenizer.model_max_length, device)
            self._warn_truncation(prompt, input_ids)
            prompt_embeds = self._text_encoder_hidden_states(input_ids.to(device), mask, clip_skip)

        if self.text_encoder is not None:
            dtype = self.text_encoder.dtype
        elif self.unet is not None:
            dtype = self.unet.dtype
        else:
            dtype = prompt_embeds.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            uncond = negative_prompts(prompt, negative_prompt, batch_size)
            uncond = self.maybe_convert_prompt(uncond, self.tokenizer)
            # The unconditional text is CLIP-encoded at its last layer even with clip_skip, as diffusers does.
            input_ids, mask = self._tokenize(uncond, prompt_embeds.shape[1], device)
            negative_prompt_embeds = self.text_encoder(input_ids.to(device), attention_mask=mask)[0]

        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    # -- preparing a call ---------------------------------------------------------------------------------------

    def open_call(self, call: CallState, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                  num_images_per_prompt, clip_skip):
        """Fire ``on_call_start``, encode the prompt and publish the conditioning in ``call.tensors``.

        Returns the conditional embeddings' dtype (the dtype latents are drawn in).
        """
        call.hook.on_call_start(pipe=self, call=call)
        cfg = self.do_classifier_free_guidance
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, self.device, num_images_per_prompt, cfg, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
        if cfg:
            # One UNet batch per step: unconditional first, as diffusers hands them to callbacks.
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
        call.tensors["prompt_embeds"] = prompt_embeds
        call.tensors["negative_prompt_embeds"] = negative_prompt_embeds
        return prompt_embeds.dtype

    def prepare_image_prompt(self, call: CallState, ip_adapter_image, ip_adapter_image_embeds, batch: int):
        """Image-prompt embeddings (``added_cond_kwargs["image_embeds"]``) for the call, computed by the adapter
        that provides them (an IP-Adapter plugin's ``image_embeds``), the unconditional half first under CFG."""
        if ip_adapter_image is None and ip_adapter_image_embeds is None:
            if self.unet.config.get("encoder_hid_dim_type") == "ip_image_proj":
                raise ValueError("an IP-Adapter is loaded, so the call needs an image prompt: pass ip_adapter_image= "
                                 "or ip_adapter_image_embeds=, or call pipe.unload_ip_adapter() first")
            return
        if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
            raise ValueError("pass ip_adapter_image or ip_adapter_image_embeds, not both")
        providers = [a for a in self.__dict__.get("_adapters", {}).values() if hasattr(a, "image_embeds")]
        if not providers:
            raise ValueError("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter; call "
                             "pipe.load_ip_adapter(...) first")
        cfg = self.do_classifier_free_guidance
        embeds = providers[0].image_embeds(ip_adapter_image, ip_adapter_image_embeds, batch, cfg)
        call.settings["image_prompt_embeds"] = (embeds, cfg)

    def configure_steps(self, call: CallState, generator, eta, batch: int, dtype):
        """Scheduler step arguments and, for guidance-distilled UNets, the guidance embedding."""
        call.settings["extra_step_kwargs"] = step_kwargs_for(self.scheduler, generator, eta)
        dim = self.unet.config.get("time_cond_proj_dim")
        if dim is not None:
            scales = torch.tensor(call.guidance_scale - 1).repeat(batch)
            call.settings["timestep_cond"] = guidance_scale_embedding(scales, embedding_dim=dim).to(
                device=self.device, dtype=dtype)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None):
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        check_generators(generator, batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, but this call needs {shape} "
                                 f"(batch x channels x height/{self.vae_scale_factor} x width/{self.vae_scale_factor})")
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    # -- the denoising steps -----------------------------------------------------------------------------------

    def prepare_model_input(self, call: CallState, step: StepState):
        latents = step.latents
        model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        step.model_input = self.scheduler.scale_model_input(model_input, step.timestep)
        step.model_timestep = step.timestep
        step.conditioning = {"encoder_hidden_states": call.tensors["prompt_embeds"]}
        if call.settings.get("timestep_cond") is not None:
            step.conditioning["timestep_cond"] = call.settings["timestep_cond"]
        if call.cross_attention_kwargs is not None:
            step.conditioning["cross_attention_kwargs"] = call.cross_attention_kwargs
        image_prompt = call.settings.get("image_prompt_embeds")
        if image_prompt is not None:
            embeds, with_guidance = image_prompt
            if with_guidance and not self.do_classifier_free_guidance:  # a callback turned guidance off
                embeds = [e.chunk(2)[1] for e in embeds]
            step.conditioning["added_cond_kwargs"] = {**step.conditioning.get("added_cond_kwargs", {}),
                                                      "image_embeds": embeds}

    def run_denoiser(self, call: CallState, step: StepState):
        return self.unet(step.model_input, step.model_timestep, **step.conditioning, return_dict=False)[0]

    def guide(self, call: CallState, step: StepState):
        if not self.do_classifier_free_guidance:
            return step.model_output
        uncond, text = step.model_output.chunk(2)
        guided = uncond + call.guidance_scale * (text - uncond)
        # Read from the call, where ``pipe._guidance_rescale = ...`` in a callback writes it.
        rescale = getattr(call, "guidance_rescale", None) or 0.0
        if rescale > 0.0:
            guided = rescale_noise_cfg(guided, text, guidance_rescale=rescale)
        return guided

    # -- decoding ----------------------------------------------------------------------------------------------

    def decode_latents_to_images(self, call: CallState, latents, output_type, dtype, generator=None):
        """``(images, nsfw_content_detected)`` in ``output_type``; flagged images come back black."""
        if output_type == "latent":
            return latents, None
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                generator=generator)[0]
        image = call.fire_after_decode(image)
        image, nsfw = self.run_safety_checker(image, self.device, dtype)
        do_denormalize = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize), nsfw

    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            return image, None
        pil = self.image_processor.postprocess(image, output_type="pil") if torch.is_tensor(image) \
            else self.image_processor.numpy_to_pil(image)
        clip_input = self.feature_extractor(pil, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
        return self.safety_checker(images=image, clip_input=clip_input)

    def finish_call(self, call: CallState, images, nsfw, return_dict: bool):
        output = StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw) if return_dict \
            else (images, nsfw)
        call.hook.on_call_end(pipe=self, call=call, output=output)
        return output


def check_generators(generator, batch_size: int):
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(f"got a list of {len(generator)} generators for {batch_size} images (prompts x "
                         f"num_images_per_prompt); pass exactly one generator per image, or a single generator")


class StableDiffusionPipeline(StableDiffusionPipelineBase):
    """Text-to-image generation with Stable Diffusion (v1, v2 and fine-tunes of them)."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(), callback=None,
                 callback_steps: int | None = None):
        # Text-to-image takes the UNet's default size unless both sides are given (diffusers does the same;
        # inpainting and SDXL default each side on its own).
        if not height or not width:
            height, width = None, None
        height, width = self.default_height_width(height, width)
        self.check_size(height, width)
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        batch = self.batch_size_of(prompt, prompt_embeds) * num_images_per_prompt

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             guidance_rescale=guidance_rescale, clip_skip=clip_skip,
                             cross_attention_kwargs=cross_attention_kwargs) as call:
            dtype = self.open_call(call, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   num_images_per_prompt, clip_skip)
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device,
                                                                timesteps, sigmas)
            latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, self.device,
                                           generator, latents)
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            images, nsfw = self.decode_latents_to_images(call, latents, output_type, dtype, generator)
            return self.finish_call(call, images, nsfw, return_dict)

