"""Stable Diffusion XL: text-to-image, and image-to-image (which is also the refiner's pipeline).

SDXL (Podell et al. 2023) differs from SD v1 in its conditioning, not in its loop:

- two CLIP text encoders read the prompt (``prompt`` and ``prompt_2``); their penultimate hidden states are
  concatenated along the feature axis, and the second encoder's projected pooled output is a global text
  embedding (``add_text_embeds``);
- "micro-conditioning": the original image size, the crop's top-left corner and the target size (or, for the
  refiner, an aesthetic score) are fed to the UNet as ``add_time_ids``, sinusoidally embedded next to the
  timestep;
- an empty negative prompt is all zeros (``force_zeros_for_empty_prompt``) rather than the encoded "".

Base and refiner share one denoising schedule: the base stops at ``denoising_end`` (a fraction of it) and
hands its latents to the refiner, which resumes at ``denoising_start`` without adding noise.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.loop import CallState, StepState
from diffloom.outputs import BaseOutput
from diffloom.pipeline import DiffusionPipeline
from diffloom.randomness import randn_tensor

from .img2img import check_strength_steps, repeat_to_batch, strength_timesteps
from .stable_diffusion import (StableDiffusionPipelineBase, check_generators, retrieve_latents, retrieve_timesteps,
                               tokenize, warn_truncation)

# Upcasting a float16 VAE changes a module other threads may be using: one call at a time does it.
_VAE_UPCAST_LOCK = threading.Lock()


@dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    images: Any = None


def is_fraction(value) -> bool:
    """``denoising_start`` / ``denoising_end`` take effect only as floats strictly between 0 and 1."""
    return isinstance(value, float) and 0 < value < 1


def timestep_cutoff(scheduler, fraction: float) -> int:
    """The training timestep at which ``fraction`` of the denoising is done."""
    total = scheduler.config.num_train_timesteps
    return int(round(total - fraction * total))


def check_denoising_range(denoising_start, denoising_end):
    if is_fraction(denoising_start) and is_fraction(denoising_end) and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}: the "
                         f"pipeline would start after it should stop; lower denoising_start or raise denoising_end")


def cut_at_denoising_end(scheduler, timesteps, denoising_end):
    """The timesteps up to ``denoising_end`` of the schedule (all of them unless it is a fraction)."""
    if not is_fraction(denoising_end):
        return timesteps
    cutoff = timestep_cutoff(scheduler, denoising_end)
    return timesteps[:sum(1 for t in timesteps if t >= cutoff)]


def latents_normalization(vae, like: torch.Tensor):
    """The VAE's per-channel latent ``(mean, std)`` when its config has them, else ``(None, None)``."""
    mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
    if mean is None or std is None:
        return None, None
    as_tensor = lambda v: torch.tensor(v).view(1, -1, 1, 1).to(device=like.device, dtype=like.dtype)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


@contextlib.contextmanager
def vae_in_float32(vae):
    """Run the VAE in float32 when it is float16 and its config asks for upcasting (SDXL's VAE overflows in
    float16); yields whether it did."""
    if not (vae.dtype == torch.float16 and vae.config.get("force_upcast", False)):
        yield False
        return
    with _VAE_UPCAST_LOCK:
        vae.to(dtype=torch.float32)
        try:
            yield True
        finally:
            vae.to(dtype=torch.float16)


class StableDiffusionXLPipelineBase(StableDiffusionPipelineBase):
    """Components, two-encoder prompt encoding, micro-conditioning and decoding of the SDXL family."""

    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder",
                            "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    # A VAE whose config asks for float32 (force_upcast) decodes in float32, as in diffusers. True: decode in
    # float16 first and upcast only when that overflows (a non-finite result), which many fine-tuned VAEs never
    # do; about twice as fast. The fast path turns it on.
    vae_float16_first = False

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None):
        # The SD v1 constructor registers a safety checker, which SDXL does not have: start from the root.
        DiffusionPipeline.__init__(self)
        if add_watermarker:
            raise ValueError("add_watermarker=True: diffloom does not provide the invisible-watermark encoder; "
                             "pass add_watermarker=False (or leave it out) and watermark the images yourself")
        self.register_modules(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                              image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = unet.config.get("sample_size", 128) if unet is not None else 128

    # -- argument checks ---------------------------------------------------------------------------------------

    def check_sdxl_prompt_inputs(self, prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                                 negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                 num_images_per_prompt, output_type):
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass prompt_2 or prompt_embeds, not both (prompt_embeds replaces both encoders' output)")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt_2 or negative_prompt_embeds, not both")
        if prompt_2 is not None and not isinstance(prompt_2, (str, list)):
            raise ValueError(f"prompt_2 must be a str or a list of str, not {type(prompt_2).__name__}")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too (the second text encoder's pooled "
                             "output, from the same encode_prompt call)")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too (from the same "
                             "encode_prompt call)")
        if prompt_embeds is None and (self.text_encoder_2 is None or self.tokenizer_2 is None):
            raise ValueError(f"{type(self).__name__} has no text_encoder_2/tokenizer_2 (the CLIPTextModelWith"
                             f"Projection that gives the pooled embedding), so it cannot encode a prompt; pass "
                             f"text_encoder_2= and tokenizer_2= when building it, or pass prompt_embeds and "
                             f"pooled_prompt_embeds")

    # -- prompt encoding ---------------------------------------------------------------------------------------

    def _encoders(self):
        """(tokenizer, text encoder) pairs; the refiner has only the second."""
        if self.text_encoder is not None and self.tokenizer is not None:
            return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(self.tokenizer_2, self.text_encoder_2)]

    def _encode_texts(self, texts_per_encoder, max_length, device, hidden_layer, warn=False):
        """Concatenated hidden states of every encoder at ``hidden_layer`` (-2 is the penultimate), and the
        pooled projection of the last encoder. Encoders take their texts in order, so a one-encoder refiner
        reads the first (``prompt``) and ignores ``prompt_2``."""
        states, pooled = [], None
        for texts, (tokenizer, encoder) in zip(texts_per_encoder, self._encoders()):
            texts = self.maybe_convert_prompt(texts, tokenizer)  # multi-vector textual-inversion tokens
            input_ids = tokenize(tokenizer, texts, max_length or tokenizer.model_max_length).input_ids
            if warn:
                warn_truncation(tokenizer, texts, input_ids)
            output = encoder(input_ids.to(device), output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds comes first
                pooled = output[0]
            states.append(output.hidden_states[hidden_layer])
        return torch.cat(states, dim=-1), pooled

    def _check_second_texts(self, name, texts, batch_size):
        """The second encoder's texts (``prompt_2``...) must pair one to one with the first's; a refiner, which has
        only the second encoder, reads the first texts and ignores them."""
        if len(self._encoders()) == 2 and len(texts) != batch_size:
            raise ValueError(f"{name} has {len(texts)} entries for {batch_size} prompts; pass a list with one "
                             f"entry per prompt")

    def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = True, negative_prompt=None, negative_prompt_2=None,
                      prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
                      negative_pooled_prompt_embeds=None, clip_skip=None):
        """``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``,
        each repeated ``num_images_per_prompt`` times per prompt (negatives are None without guidance).

        ``clip_skip`` counts from the penultimate layer, which SDXL uses by default; the negative prompt is
        always read at the penultimate layer.
        """
        device = device or self.device
        prompt = [prompt] if isinstance(prompt, str) else prompt
        batch_size = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_2 = prompt_2 or prompt
            prompt_2 = [prompt_2] if isinstance(prompt_2, str) else prompt_2
            self._check_second_texts("prompt_2", prompt_2, batch_size)
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            prompt_embeds, pooled = self._encode_texts([prompt, prompt_2], None, device, layer, warn=True)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negative_prompt = negative_prompt or ""
                negative_prompt_2 = negative_prompt_2 or negative_prompt
                negatives = [[n] * batch_size if isinstance(n, str) else n
                             for n in (negative_prompt, negative_prompt_2)]
                if prompt is not None and type(prompt) is not type(negatives[0]):
                    raise TypeError(f"negative_prompt must be of the same type as prompt ({type(prompt).__name__}),"
                                    f" got {type(negative_prompt).__name__}")
                if len(negatives[0]) != batch_size:
                    raise ValueError(f"negative_prompt has {len(negatives[0])} entries but prompt has "
                                     f"{batch_size}; pass one negative prompt per prompt (or a single string)")
                self._check_second_texts("negative_prompt_2", negatives[1], batch_size)
                negative_prompt_embeds, pooled = self._encode_texts(negatives, prompt_embeds.shape[1], device, -2)
                if negative_pooled_prompt_embeds is None:
                    negative_pooled_prompt_embeds = pooled

        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        repeat = lambda t: t.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)  # noqa
        prompt_embeds, pooled_prompt_embeds = repeat(prompt_embeds), repeat(pooled_prompt_embeds)
        if do_classifier_free_guidance:
            negative_prompt_embeds = repeat(negative_prompt_embeds)
            negative_pooled_prompt_embeds = repeat(negative_pooled_prompt_embeds)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # -- micro-conditioning ------------------------------------------------------------------------------------

    def text_encoder_projection_dim(self, pooled_prompt_embeds) -> int:
        if self.text_encoder_2 is None:
            return int(pooled_prompt_embeds.shape[-1])
        return self.text_encoder_2.config.projection_dim

    def time_ids(self, values, dtype, projection_dim) -> torch.Tensor:
        """One row of ``add_time_ids``, checked against what the UNet's added embedding expects."""
        values = list(values)
        given = self.unet.config.addition_time_embed_dim * len(values) + projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if given != expected:
            hint = ""
            if abs(expected - given) == self.unet.config.addition_time_embed_dim:
                hint = (" (a refiner UNet takes an aesthetic score instead of the target size: build the "
                        "pipeline with requires_aesthetics_score=True, or False for a base UNet)")
            raise ValueError(f"the UNet's added embedding takes {expected} features, but {len(values)} time ids "
                             f"{values} of {self.unet.config.addition_time_embed_dim} each plus a pooled text "
                             f"embedding of {projection_dim} make {given}{hint}")
        return torch.tensor([values], dtype=dtype)

    def publish_conditioning(self, call: CallState, embeds, add_time_ids, negative_add_time_ids, batch,
                             alternate_time_ids: bool = False):
        """Put the UNet's conditioning into ``call.tensors``, stacked [unconditional, conditional] with guidance.

        Each of the ``batch`` images gets its own row of time ids, unconditional rows before conditional
        ones, as for the prompt embeddings. With ``alternate_time_ids`` the rows alternate negative, positive
        instead, as diffusers' SDXL text-to-image and ControlNet pipelines stack them: with a negative
        micro-conditioning and several images, rows then meet the other half's time ids. Followed so that the
        same arguments give the same images; it changes nothing when both time ids are equal (the default).
        """
        prompt_embeds, negative_prompt_embeds, pooled, negative_pooled = embeds
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            pooled = torch.cat([negative_pooled, pooled])
            if alternate_time_ids:
                add_time_ids = torch.cat([negative_add_time_ids, add_time_ids]).repeat(batch, 1)
            else:
                add_time_ids = torch.cat([negative_add_time_ids.repeat(batch, 1), add_time_ids.repeat(batch, 1)])
        else:
            add_time_ids = add_time_ids.repeat(batch, 1)
        device = self.device
        call.tensors.update(prompt_embeds=prompt_embeds.to(device), add_text_embeds=pooled.to(device),
                            add_time_ids=add_time_ids.to(device))

    # -- the denoising steps -----------------------------------------------------------------------------------

    def prepare_model_input(self, call: CallState, step: StepState):
        super().prepare_model_input(call, step)
        # Merged into what the base put there (an image prompt's embeddings).
        step.conditioning["added_cond_kwargs"] = {**step.conditioning.get("added_cond_kwargs", {}),
                                                  "text_embeds": call.tensors["add_text_embeds"],
                                                  "time_ids": call.tensors["add_time_ids"]}

    # -- decoding ----------------------------------------------------------------------------------------------

    def decode_latents(self, latents):
        upcasts = self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False)
        if upcasts and self.vae_float16_first:
            image = self._decode(latents)
            if torch.isfinite(image).all():
                return image
        with vae_in_float32(self.vae) as upcast:
            return self._decode(latents.to(torch.float32) if upcast else latents)

    def _decode(self, latents):
        mean, std = latents_normalization(self.vae, latents)
        if mean is not None:
            latents = latents * std / self.vae.config.scaling_factor + mean
        else:
            latents = latents / self.vae.config.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def encode_image(self, image, generator, dtype, normalize: bool = True):
        """Scaled latents of an image batch, normalised with the VAE's latent statistics when it has them and
        ``normalize`` (image-to-image does, inpainting does not)."""
        with vae_in_float32(self.vae):
            image = image.to(self.vae.dtype)
            if isinstance(generator, list):
                latents = torch.cat([retrieve_latents(self.vae.encode(image[i:i + 1]), generator=generator[i])
                                     for i in range(image.shape[0])])
            else:
                latents = retrieve_latents(self.vae.encode(image), generator=generator)
        latents = latents.to(dtype)
        mean, std = latents_normalization(self.vae, latents) if normalize else (None, None)
        if mean is not None:
            return (latents - mean) * self.vae.config.scaling_factor / std
        return self.vae.config.scaling_factor * latents

    def finish_sdxl_call(self, call: CallState, latents, output_type, return_dict, finish_images=None):
        """Decode (unless ``output_type="latent"``), post-process and fire ``on_call_end``; ``finish_images``
        changes the post-processed images (inpainting pastes them back into the original)."""
        if output_type == "latent":
            images = latents
        else:
            images = call.fire_after_decode(self.decode_latents(latents))
            images = self.image_processor.postprocess(images, output_type=output_type)
            if finish_images is not None:
                images = finish_images(images)
        output = StableDiffusionXLPipelineOutput(images=images) if return_dict else (images,)
        call.hook.on_call_end(pipe=self, call=call, output=output)
        return output


class StableDiffusionXLPipeline(StableDiffusionXLPipelineBase):
    """Text-to-image generation with Stable Diffusion XL."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 50,
                 timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                 denoising_end: float | None = None, guidance_scale: float = 5.0,
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
                 negative_target_size: tuple[int, int] | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None,
                 hooks=(), callback=None,
                 callback_steps: int | None = None):
        height, width = self.default_height_width(height, width)
        self.check_size(height, width)
        self.check_sdxl_prompt_inputs(prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                                      negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                      num_images_per_prompt, output_type)
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        batch = self.batch_size_of(prompt, prompt_embeds) * num_images_per_prompt

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             guidance_rescale=guidance_rescale, clip_skip=clip_skip, denoising_end=denoising_end,
                             cross_attention_kwargs=cross_attention_kwargs) as call:
            call.hook.on_call_start(pipe=self, call=call)
            embeds = self.encode_prompt(prompt, prompt_2, self.device, num_images_per_prompt,
                                        self.do_classifier_free_guidance, negative_prompt, negative_prompt_2,
                                        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                        negative_pooled_prompt_embeds, clip_skip)
            dtype = embeds[0].dtype
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device,
                                                                timesteps, sigmas)
            latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, self.device,
                                           generator, latents)
            self.configure_steps(call, generator, eta, batch, latents.dtype)

            projection_dim = self.text_encoder_projection_dim(embeds[2])
            add_time_ids = self.time_ids(original_size + crops_coords_top_left + target_size, dtype,
                                         projection_dim)
            negative_add_time_ids = add_time_ids
            if negative_original_size is not None and negative_target_size is not None:
                negative_add_time_ids = self.time_ids(
                    negative_original_size + negative_crops_coords_top_left + negative_target_size, dtype,
                    projection_dim)
            self.publish_conditioning(call, embeds, add_time_ids, negative_add_time_ids, batch,
                                      alternate_time_ids=True)

            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
            timesteps = cut_at_denoising_end(self.scheduler, timesteps, denoising_end)
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            return self.finish_sdxl_call(call, latents, output_type, return_dict)


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLPipelineBase):
    """Image-to-image with Stable Diffusion XL, and the SDXL refiner (resuming a base pipeline's latents at
    ``denoising_start``)."""

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, requires_aesthetics_score: bool = False,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         add_watermarker=add_watermarker)
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def schedule_from(self, num_inference_steps, strength, denoising_start):
        """The timesteps to run and their count: the tail ``strength`` keeps or, when ``denoising_start`` is a
        fraction, those below its cutoff (strength is then ignored)."""
        scheduler = self.scheduler
        if not is_fraction(denoising_start):
            return strength_timesteps(scheduler, num_inference_steps, strength)
        cutoff = timestep_cutoff(scheduler, denoising_start)
        count = int((scheduler.timesteps < cutoff).sum().item())
        if scheduler.order == 2 and count % 2 == 0:
            # A second-order scheduler repeats every timestep but the first; an even count would start
            # between the two halves of a step.
            count += 1
        start = len(scheduler.timesteps) - count
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:], count

    def micro_conditioning(self, original_size, crops_coords_top_left, target_size, aesthetic_score,
                           negative_aesthetic_score, negative_original_size, negative_crops_coords_top_left,
                           negative_target_size, dtype, projection_dim):
        """``(add_time_ids, negative_add_time_ids)``: sizes and crop, with the refiner's aesthetic score in
        place of the target size. The base's negative ids reuse the positive crop, as diffusers does."""
        if self.config.requires_aesthetics_score:
            positive = original_size + crops_coords_top_left + (aesthetic_score,)
            negative = negative_original_size + negative_crops_coords_top_left + (negative_aesthetic_score,)
        else:
            positive = original_size + crops_coords_top_left + target_size
            negative = negative_original_size + crops_coords_top_left + negative_target_size
        return self.time_ids(positive, dtype, projection_dim), self.time_ids(negative, dtype, projection_dim)

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None,
                        add_noise: bool = True):
        image = image.to(device=device, dtype=dtype)
        batch = batch_size * num_images_per_prompt
        if image.shape[1] == 4:
            init_latents = image  # latents from another pipeline (output_type="latent")
        else:
            check_generators(generator, batch)
            if isinstance(generator, list) and image.shape[0] < batch:
                image = repeat_to_batch(image, batch, "image")
            init_latents = self.encode_image(image, generator, dtype)
        init_latents = repeat_to_batch(init_latents, batch, "image")
        if not add_noise:
            return init_latents
        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None, image=None,
                 strength: float = 0.3, num_inference_steps: int = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, guidance_scale: float = 5.0,
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
        self.check_strength(strength)
        check_denoising_range(denoising_start, denoising_end)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if image is None:
            raise ValueError(f"{type(self).__name__} needs an image= to start from (an image, or latents from a "
                             f"base pipeline called with output_type='latent')")
        self.check_sdxl_prompt_inputs(prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                                      negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                      num_images_per_prompt, output_type)
        batch_size = self.batch_size_of(prompt, prompt_embeds)
        batch = batch_size * num_images_per_prompt
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
            image = self.image_processor.preprocess(image)
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                                timesteps, sigmas)
            timesteps, num_inference_steps = self.schedule_from(num_inference_steps, strength, denoising_start)
            if not is_fraction(denoising_start):
                # A denoising_start past the schedule's last timestep leaves nothing to do, and the image comes
                # back as it went in (through the VAE), as in diffusers; strength must leave a step.
                check_strength_steps(strength, num_inference_steps)
            if latents is None:
                latents = self.prepare_latents(image, timesteps[:1].repeat(batch), batch_size,
                                               num_images_per_prompt, dtype, device, generator,
                                               add_noise=denoising_start is None)
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
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            return self.finish_sdxl_call(call, latents, output_type, return_dict)
