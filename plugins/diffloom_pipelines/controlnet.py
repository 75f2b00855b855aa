"""Stable Diffusion (v1 and XL) with ControlNet (Zhang et al. 2023): a condition image (edges, depth, pose...)
steers the layout.

Each step a ControlNet, a trainable copy of the UNet's encoder, reads the noisy latents and the condition image
and returns one residual per UNet skip connection plus one for the middle block; the UNet adds them in. Each
residual is scaled by ``controlnet_conditioning_scale`` and switched off outside the fraction of the schedule
between ``control_guidance_start`` and ``control_guidance_end``. Several ControlNets (a list, or a
``MultiControlNetModel``) each read their own image and their residuals are summed.

In guess mode the ControlNet sees only the conditional half of the batch, so the unconditional prediction is
made without control and guidance amplifies what the ControlNet recognised in the image.
"""

from __future__ import annotations

import os
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from diffloom.callbacks import deprecated_step_callback_hooks
from diffloom.images import VaeImageProcessor
from diffloom.loop import CallState, StepState

from .sdxl import StableDiffusionXLPipelineBase, cut_at_denoising_end
from .stable_diffusion import StableDiffusionPipelineBase, retrieve_timesteps


class MultiControlNetModel(nn.Module):
    """Several ControlNets applied together: each reads its own condition image, their residuals add up.

    Saved as diffusers does, one folder per net: ``path``, ``path_1``, ``path_2``...
    """

    def __init__(self, controlnets):
        super().__init__()
        if not controlnets:
            raise ValueError("MultiControlNetModel needs at least one ControlNet")
        self.nets = nn.ModuleList(controlnets)

    @property
    def dtype(self) -> torch.dtype:
        return self.nets[0].dtype

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale,
                class_labels=None, timestep_cond=None, attention_mask=None, added_cond_kwargs=None,
                cross_attention_kwargs=None, guess_mode: bool = False, return_dict: bool = True):
        if len(controlnet_cond) != len(self.nets) or len(conditioning_scale) != len(self.nets):
            raise ValueError(f"{len(self.nets)} ControlNets need as many condition images and scales; got "
                             f"{len(controlnet_cond)} images and {len(conditioning_scale)} scales")
        down, mid = None, None
        for net, image, scale in zip(self.nets, controlnet_cond, conditioning_scale):
            net_down, net_mid = net(sample, timestep, encoder_hidden_states, image, scale, class_labels=class_labels,
                                    timestep_cond=timestep_cond, attention_mask=attention_mask,
                                    added_cond_kwargs=added_cond_kwargs,
                                    cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode,
                                    return_dict=False)
            if down is None:
                down, mid = list(net_down), net_mid
            else:
                down = [a + b for a, b in zip(down, net_down)]
                mid = mid + net_mid
        return down, mid

    def save_pretrained(self, save_directory, **kwargs):
        save_directory = os.fspath(save_directory)
        for i, net in enumerate(self.nets):
            net.save_pretrained(save_directory + ("" if i == 0 else f"_{i}"), **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_path, **kwargs):
        from diffloom import ControlNetModel

        # A pipeline loader hands torch.nn.Module components the transformers-style "dtype".
        if "dtype" in kwargs:
            kwargs["torch_dtype"] = kwargs.pop("dtype")
        base = os.fspath(pretrained_model_path)
        nets, path = [], base
        while Path(path).is_dir():
            nets.append(ControlNetModel.from_pretrained(path, **kwargs))
            path = f"{base}_{len(nets)}"
        if not nets:
            raise ValueError(f"no ControlNet folder at {base} (MultiControlNetModel reads {base}, {base}_1, ...)")
        return cls(nets)


def control_keep(num_steps: int, starts, ends) -> list[list[float]]:
    """Per step and per ControlNet, 1.0 while the step lies inside [start, end] of the schedule, else 0.0."""
    return [[0.0 if i / num_steps < s or (i + 1) / num_steps > e else 1.0 for s, e in zip(starts, ends)]
            for i in range(num_steps)]


class ControlNetMixin:
    """Argument checks, condition-image preparation and the controlled denoiser step, shared by the SD and
    SDXL ControlNet pipelines."""

    # The ControlNets' weight changes from step to step (control_guidance_start/end).
    denoiser_components = ()
    # Whether several ControlNets take a list of lists, one row per prompt (diffusers' SD pipeline does, its SDXL
    # pipeline does not).
    rows_of_control_images = True

    def control_nets(self) -> list:
        controlnet = self.controlnet
        return list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]

    def control_settings(self, image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end,
                         prompt_batch):
        """Check the control arguments and bring them to one entry per ControlNet:
        ``(images, scales, starts, ends)``."""
        count = len(self.control_nets())
        multi = isinstance(self.controlnet, MultiControlNetModel)
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image= (the ControlNet's condition image)")
        images = self._images_per_net(image, count, self.rows_of_control_images) if multi else [image]
        for k, one in enumerate(images):
            # As in diffusers, anything but a PIL image counts its entries along the first axis: a list's
            # length, a tensor's or an array's first dimension (so a 3-D CHW tensor is three images).
            n = 1 if isinstance(one, PIL.Image.Image) else len(one)
            if n != 1 and n != prompt_batch:
                where = f"ControlNet {k}'s image" if multi else "image"
                hint = ""
                if not isinstance(one, list) and getattr(one, "ndim", 0) == 3:
                    hint = (" (a 3-D tensor or array is read as a batch along its first axis: pass a 4-D batch, "
                            "e.g. image[None], or a PIL image)")
                raise ValueError(f"{where} has {n} condition images for {prompt_batch} prompts{hint}; pass one "
                                 f"image for all prompts or one per prompt")
        scales = controlnet_conditioning_scale
        if isinstance(scales, (list, tuple)):
            if not multi:
                raise TypeError(f"controlnet_conditioning_scale is a {type(scales).__name__}, but there is one "
                                f"ControlNet: pass a single float")
            if any(isinstance(s, (list, tuple)) for s in scales):
                raise ValueError("controlnet_conditioning_scale holds a list per ControlNet; the scale of a "
                                 "ControlNet is one float for the whole batch")
            if len(scales) != count:
                raise ValueError(f"controlnet_conditioning_scale has {len(scales)} entries for {count} ControlNets; "
                                 f"pass one scale per ControlNet, or a single float")
            scales = list(scales)
        else:
            scales = [scales] * count
        starts, ends = control_guidance_start, control_guidance_end
        if not isinstance(starts, (list, tuple)) and isinstance(ends, (list, tuple)):
            starts = [starts] * len(ends)
        elif isinstance(starts, (list, tuple)) and not isinstance(ends, (list, tuple)):
            ends = [ends] * len(starts)
        elif not isinstance(starts, (list, tuple)):
            starts, ends = [starts] * count, [ends] * count
        if len(starts) != count or len(ends) != count:
            raise ValueError(f"control_guidance_start/end have {len(starts)}/{len(ends)} entries for {count} "
                             f"ControlNets; pass one value per ControlNet, or a single float")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control_guidance_start={s} and control_guidance_end={e} must satisfy "
                                 f"0 <= start < end <= 1 (fractions of the schedule)")
        return images, scales, list(starts), list(ends)

    @staticmethod
    def _images_per_net(image, count: int, rows: bool) -> list:
        """Several ControlNets take a list with one condition image (or batch) per ControlNet or, where ``rows``,
        a list of lists with one row per prompt, each row holding one image per ControlNet (diffusers' layout);
        the rows are regrouped per ControlNet."""
        if not isinstance(image, list):
            raise ValueError(f"image must be a list of one condition image per ControlNet ({count}), got "
                             f"{type(image).__name__}")
        nested = any(isinstance(row, list) for row in image)
        if nested and not rows:
            raise ValueError(f"image holds lists, which this pipeline does not take with several ControlNets; pass "
                             f"one condition image (PIL, or a tensor/array batch) per ControlNet ({count})")
        if nested:
            widths = sorted({len(row) if isinstance(row, list) else 1 for row in image})
            if widths != [count] or not all(isinstance(row, list) for row in image):
                raise ValueError(f"image is a list of lists, read as one row per prompt with one condition image "
                                 f"per ControlNet, so every row must be a list of {count} images; got rows of "
                                 f"{', '.join(map(str, widths))}")
            return [list(column) for column in zip(*image)]
        if len(image) != count:
            raise ValueError(f"image must be a list of one condition image per ControlNet ({count}), got "
                             f"{len(image)} entries")
        return image

    def prepare_control_image(self, image, width, height, batch, num_images_per_prompt, dtype, stacked: bool):
        """The condition image in [0, 1] at the output size, one per image in the batch, twice over when the
        ControlNet sees both halves of a guided batch (``stacked``)."""
        image = self.control_image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        image = image.repeat_interleave(batch if image.shape[0] == 1 else num_images_per_prompt, dim=0)
        image = image.to(device=self.device, dtype=dtype)
        return torch.cat([image] * 2) if stacked else image

    def prepare_control_images(self, images, width, height, batch, num_images_per_prompt, guess_mode):
        """Every ControlNet's condition image, all of one size; returns ``(images, height, width)``."""
        stacked = self.do_classifier_free_guidance and not guess_mode
        prepared = [self.prepare_control_image(im, width, height, batch, num_images_per_prompt,
                                               self.controlnet.dtype, stacked) for im in images]
        sizes = {tuple(p.shape[-2:]) for p in prepared}
        if len(sizes) > 1:
            raise ValueError(f"the condition images have different sizes {sorted(sizes)}; resize them to one size "
                             f"or pass height= and width=")
        height, width = prepared[-1].shape[-2:]
        return prepared, height, width

    def control_residuals(self, call: CallState, step: StepState, added_cond_kwargs=None):
        """The ControlNets' ``(down, mid)`` residuals for this step, batched like the UNet's input."""
        guess_mode = call.settings["guess_mode"]
        cfg = self.do_classifier_free_guidance
        prompt_embeds = call.tensors["prompt_embeds"]
        model_input = step.model_input
        if guess_mode and cfg:
            # Only the conditional half goes through the ControlNet.
            model_input = self.scheduler.scale_model_input(step.latents, step.timestep)
            prompt_embeds = prompt_embeds.chunk(2)[1]
            if added_cond_kwargs is not None:
                added_cond_kwargs = {k: v.chunk(2)[1] for k, v in added_cond_kwargs.items()}
        keep = call.settings["control_keep"][step.index]
        scales = [s * k for s, k in zip(call.settings["control_scales"], keep)]
        multi = isinstance(self.controlnet, MultiControlNetModel)
        extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        down, mid = self.controlnet(model_input, step.timestep, encoder_hidden_states=prompt_embeds,
                                    controlnet_cond=call.tensors["image"],
                                    conditioning_scale=scales if multi else scales[0], guess_mode=guess_mode,
                                    return_dict=False, **extra)
        if guess_mode and cfg:
            # No control on the unconditional half.
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid

    def guess_mode_for(self, guess_mode: bool) -> bool:
        # ControlNets trained with globally pooled conditions work only in guess mode.
        return guess_mode or bool(self.control_nets()[0].config.get("global_pool_conditions", False))


class StableDiffusionControlNetPipeline(ControlNetMixin, StableDiffusionPipelineBase):
    """Text-to-image generation with Stable Diffusion steered by one or several ControlNets."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "image"]
    _scheduler_fixes: dict = {}  # the scheduler's and the UNet's configs are taken as they are

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, safety_checker, feature_extractor,
                 image_encoder=None, requires_safety_checker: bool = True):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        super().__init__(vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor,
                         image_encoder=image_encoder, requires_safety_checker=requires_safety_checker)
        self.register_modules(controlnet=controlnet)
        self.control_image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor,
                                                         do_convert_rgb=True, do_normalize=False)

    @staticmethod
    def _fix_unet_config(unet):
        return None

    def run_denoiser(self, call: CallState, step: StepState):
        down, mid = self.control_residuals(call, step)
        return self.unet(step.model_input, step.model_timestep, **step.conditioning,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 50, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: list[torch.Tensor] | None = None, output_type: str = "pil",
                 return_dict: bool = True, cross_attention_kwargs: dict | None = None,
                 controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
                 control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, hooks=(),
                 callback=None, callback_steps: int | None = None):
        self.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                 num_images_per_prompt, output_type)
        prompt_batch = self.batch_size_of(prompt, prompt_embeds)
        images, scales, starts, ends = self.control_settings(
            image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, prompt_batch)
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
            control, height, width = self.prepare_control_images(images, width, height, batch,
                                                                 num_images_per_prompt, guess_mode)
            # A MultiControlNetModel takes a list of images, a single ControlNet its one image.
            call.tensors["image"] = control if isinstance(self.controlnet, MultiControlNetModel) else control[0]
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device,
                                                                timesteps, sigmas)
            latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, self.device,
                                           generator, latents)
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            call.settings["control_keep"] = control_keep(len(timesteps), starts, ends)
            num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            images, nsfw = self.decode_latents_to_images(call, latents, output_type, dtype, generator)
            return self.finish_call(call, images, nsfw, return_dict)


class StableDiffusionXLControlNetPipeline(ControlNetMixin, StableDiffusionXLPipelineBase):
    """Text-to-image generation with Stable Diffusion XL steered by one or several ControlNets."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "add_text_embeds",
                               "add_time_ids", "negative_pooled_prompt_embeds", "negative_add_time_ids", "image"]
    rows_of_control_images = False

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, controlnet, scheduler,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None,
                 feature_extractor=None, image_encoder=None):
        if isinstance(controlnet, (list, tuple)):
            controlnet = MultiControlNetModel(controlnet)
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.register_modules(controlnet=controlnet)
        self.control_image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor,
                                                         do_convert_rgb=True, do_normalize=False)

    def run_denoiser(self, call: CallState, step: StepState):
        # The ControlNet reads the micro-conditioning only: an image prompt steers the UNet's cross-attention,
        # and the ControlNet has no IP-Adapter layers.
        added = step.conditioning["added_cond_kwargs"]
        down, mid = self.control_residuals(
            call, step, added_cond_kwargs={"text_embeds": added["text_embeds"], "time_ids": added["time_ids"]})
        return self.unet(step.model_input, step.model_timestep, **step.conditioning,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]

    def guide(self, call: CallState, step: StepState):
        # As in diffusers' SDXL ControlNet pipeline, a callback setting ``pipe._guidance_scale`` only turns
        # guidance on or off; the strength stays the guidance_scale the call was given.
        if not self.do_classifier_free_guidance:
            return step.model_output
        uncond, text = step.model_output.chunk(2)
        return uncond + call.given_guidance_scale * (text - uncond)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None, image=None,
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
                 controlnet_conditioning_scale: float | list[float] = 1.0, guess_mode: bool = False,
                 control_guidance_start: float | list[float] = 0.0, control_guidance_end: float | list[float] = 1.0,
                 original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
                 target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
                 negative_crops_coords_top_left: tuple[int, int] = (0, 0),
                 negative_target_size: tuple[int, int] | None = None, clip_skip: int | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None,
                 hooks=(), callback=None,
                 callback_steps: int | None = None):
        self.check_sdxl_prompt_inputs(prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                                      negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                                      num_images_per_prompt, output_type)
        prompt_batch = self.batch_size_of(prompt, prompt_embeds)
        images, scales, starts, ends = self.control_settings(
            image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end, prompt_batch)
        guess_mode = self.guess_mode_for(guess_mode)
        batch = prompt_batch * num_images_per_prompt

        hooks = [*hooks, *deprecated_step_callback_hooks(callback, callback_steps)]
        with self.start_call(guidance_scale=guidance_scale, hooks=hooks, callback_on_step_end=callback_on_step_end,
                             callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                             clip_skip=clip_skip, denoising_end=denoising_end,
                             cross_attention_kwargs=cross_attention_kwargs, guess_mode=guess_mode,
                             control_scales=scales, given_guidance_scale=guidance_scale) as call:
            call.hook.on_call_start(pipe=self, call=call)
            embeds = self.encode_prompt(prompt, prompt_2, self.device, num_images_per_prompt,
                                        self.do_classifier_free_guidance, negative_prompt, negative_prompt_2,
                                        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                        negative_pooled_prompt_embeds, clip_skip)
            dtype = embeds[0].dtype
            self.prepare_image_prompt(call, ip_adapter_image, ip_adapter_image_embeds, batch)
            control, height, width = self.prepare_control_images(images, width, height, batch,
                                                                 num_images_per_prompt, guess_mode)
            call.tensors["image"] = control if isinstance(self.controlnet, MultiControlNetModel) else control[0]
            timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, self.device,
                                                                timesteps, sigmas)
            latents = self.prepare_latents(batch, self.unet.config.in_channels, height, width, dtype, self.device,
                                           generator, latents)
            self.configure_steps(call, generator, eta, batch, latents.dtype)
            call.settings["control_keep"] = control_keep(len(timesteps), starts, ends)

            projection_dim = self.text_encoder_projection_dim(embeds[2])
            add_time_ids = self.time_ids(tuple(original_size or (height, width)) + tuple(crops_coords_top_left)
                                         + tuple(target_size or (height, width)), dtype, projection_dim)
            negative_add_time_ids = add_time_ids
            if negative_original_size is not None and negative_target_size is not None:
                negative_add_time_ids = self.time_ids(
                    negative_original_size + negative_crops_coords_top_left + negative_target_size, dtype,
                    projection_dim)
            self.publish_conditioning(call, embeds, add_time_ids, negative_add_time_ids, batch,
                                      alternate_time_ids=True)
            call.tensors.update(negative_prompt_embeds=embeds[1], negative_pooled_prompt_embeds=embeds[3],
                                negative_add_time_ids=negative_add_time_ids)

            num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)
            timesteps = cut_at_denoising_end(self.scheduler, timesteps, denoising_end)
            latents = self.denoise(call, latents, timesteps, num_warmup_steps)
            return self.finish_sdxl_call(call, latents, output_type, return_dict)
