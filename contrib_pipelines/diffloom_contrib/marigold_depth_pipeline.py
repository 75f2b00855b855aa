"""Marigold depth with the API of diffusers' core ``MarigoldDepthPipeline`` (Ke et al., CVPR 2024; v1.1 models).

A Stable Diffusion UNet fine-tuned to denoise depth latents: it sees ``[image latent, depth latent]`` (8 channels)
and the embedding of the empty prompt. Each of the ``ensemble_size`` members per image starts from its own noise
and is denoised on its own; the VAE decodes a member to 3 channels whose mean, mapped from [-1, 1] to [0, 1], is the
depth. An affine-invariant model's members are then aligned by a per-member scale and shift, merged by the
median (or mean), and the merged map is stretched onto [0, 1]; the members' spread is the uncertainty.

The folder layout and model-index keys are those of the ``prs-eth/marigold-depth-*`` checkpoints:
``prediction_type``, ``scale_invariant``, ``shift_invariant``, ``default_denoising_steps`` and
``default_processing_resolution``. Images are ``[0, 1]`` arrays/tensors or PIL images, one, a batch or a list.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from diffloom import DiffusionPipeline, randn_tensor
from diffloom.configuration import ConfigMixin, register_to_config
from diffloom.outputs import BaseOutput
from diffloom_contrib.marigold_depth import color_map_points

logger = logging.getLogger(__name__)

RESAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
ENSEMBLING_KEYS = ("reduction", "regularizer_strength", "max_iter", "tol", "max_res")
BUILT_IN_COLOR_MAPS = ("Spectral", "binary")


@dataclass
class MarigoldDepthOutput(BaseOutput):
    """``prediction``: depth in [0, 1], (N, H, W, 1) for ``output_type="np"`` or (N, 1, H, W) for ``"pt"``;
    ``uncertainty``: the ensemble's spread in the same layout (or None); ``latent``: the N * E final depth latents,
    reusable as ``latents=`` (or None)."""

    prediction: Any = None
    uncertainty: Any = None
    latent: Any = None


class MarigoldImageProcessor(ConfigMixin):
    """Loads Marigold's inputs into one normalised, VAE-aligned batch, and turns predictions into pictures."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, vae_scale_factor: int = 8, do_normalize: bool = True, do_range_check: bool = True):
        super().__init__()

    # -- layout conversions ----------------------------------------------------------------------------------

    @staticmethod
    def expand_tensor_or_array(images):
        """Add the missing batch (and channel) axes: arrays become (N, H, W, C), tensors (N, C, H, W)."""
        if isinstance(images, np.ndarray):
            return images[None, ..., None] if images.ndim == 2 else images[None] if images.ndim == 3 else images
        if torch.is_tensor(images):
            return images[None, None] if images.ndim == 2 else images[None] if images.ndim == 3 else images
        raise ValueError(f"expected a numpy array or a torch tensor, got {type(images).__name__}")

    @staticmethod
    def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) tensor -> (N, H, W, C) float32 array."""
        return images.cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
        """(N, H, W, C) array -> (N, C, H, W) tensor of the same dtype."""
        _check_array_dtype(images)
        return torch.from_numpy(images.transpose(0, 3, 1, 2))

    # -- geometry --------------------------------------------------------------------------------------------

    @staticmethod
    def resize_antialias(image: torch.Tensor, size, mode: str, is_aa: bool | None = None) -> torch.Tensor:
        """Resize a float (N, C, H, W) batch; ``is_aa`` low-pass filters first (bilinear and bicubic only)."""
        _check_float_batch(image)
        return F.interpolate(image, size, mode=mode, antialias=bool(is_aa) and mode in ("bilinear", "bicubic"))

    @staticmethod
    def resize_to_max_edge(image: torch.Tensor, max_edge_sz: int, mode: str) -> torch.Tensor:
        """Resize (with anti-aliasing) so the longer side is ``max_edge_sz``; sides are rounded down."""
        _check_float_batch(image)
        height, width = _scaled_size(*image.shape[-2:], max_edge_sz)
        return MarigoldImageProcessor.resize_antialias(image, (height, width), mode, is_aa=True)

    @staticmethod
    def pad_image(image: torch.Tensor, align: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pad bottom and right by repeating the edge up to multiples of ``align``; returns the padding too."""
        _check_float_batch(image)
        pad_h, pad_w = -image.shape[-2] % align, -image.shape[-1] % align
        return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate"), (pad_h, pad_w)

    @staticmethod
    def unpad_image(image: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        _check_float_batch(image)
        height, width = image.shape[-2:]
        return image[:, :, : height - padding[0], : width - padding[1]]

    # -- inputs ----------------------------------------------------------------------------------------------

    @staticmethod
    def load_image_canonical(image, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """One PIL image, array or tensor (2-4 dims) -> a (N, 3, H, W) batch in ``dtype``.

        Unsigned integers are divided by their type's maximum; floats are taken as given (expected in [0, 1]).
        One channel is repeated to three.
        """
        if isinstance(image, PIL.Image.Image):
            image = np.array(image)
        if not isinstance(image, (np.ndarray, torch.Tensor)):
            raise ValueError(f"image must be a PIL image, a numpy array or a torch tensor, got "
                             f"{type(image).__name__}")
        image = MarigoldImageProcessor.expand_tensor_or_array(image)
        if image.ndim != 4:
            raise ValueError(f"image has {image.ndim} dimensions; pass (H, W), (H, W, C) / (C, H, W) or a batch "
                             f"(N, H, W, C) / (N, C, H, W)")
        full_scale = None
        if isinstance(image, np.ndarray):
            _check_array_dtype(image)
            if np.issubdtype(image.dtype, np.unsignedinteger):
                full_scale = np.iinfo(image.dtype).max
                image = image.astype(np.float32)  # torch has no uint16/uint32 arithmetic
            image = torch.from_numpy(image.transpose(0, 3, 1, 2))
        elif not torch.is_floating_point(image):
            if image.dtype != torch.uint8:
                raise ValueError(f"image tensor of dtype {image.dtype} is not supported: pass uint8 or floats in "
                                 f"[0, 1]")
            full_scale = 255
        if image.shape[1] == 1:
            image = image.repeat(1, 3, 1, 1)
        if image.shape[1] != 3:
            raise ValueError(f"image has {image.shape[1]} channels (shape {tuple(image.shape)}); Marigold takes 1 "
                             f"or 3 (convert RGBA images with .convert('RGB'))")
        image = image.to(device=device, dtype=dtype)
        return image / full_scale if full_scale is not None else image

    @staticmethod
    def check_image_values_range(image: torch.Tensor) -> None:
        _check_float_batch(image, dims=None)
        if image.min().item() < 0.0 or image.max().item() > 1.0:
            raise ValueError("image values must lie in [0, 1] (float arrays and tensors are not rescaled); got "
                             f"[{image.min().item():g}, {image.max().item():g}]")

    def preprocess(self, image, processing_resolution: int | None = None, resample_method_input: str = "bilinear",
                   device="cpu", dtype=torch.float32):
        """Images -> (batch in [-1, 1] resized and padded for the VAE, (pad_h, pad_w), original (H, W))."""
        parts = [self.load_image_canonical(item, device, dtype) for item in (image if isinstance(image, list)
                                                                              else [image])]
        for i, part in enumerate(parts[1:], start=1):
            if part.shape[2:] != parts[0].shape[2:]:
                raise ValueError(f"image[{i}] is {tuple(part.shape[2:])} (H, W) but image[0] is "
                                 f"{tuple(parts[0].shape[2:])}: all images of one call must share their size")
        batch = torch.cat(parts) if len(parts) > 1 else parts[0]
        original_resolution = batch.shape[2:]
        if self.config.do_range_check:
            self.check_image_values_range(batch)
        if self.config.do_normalize:
            batch = batch * 2.0 - 1.0
        if processing_resolution is not None and processing_resolution > 0:
            batch = self.resize_to_max_edge(batch, processing_resolution, resample_method_input)
        batch, padding = self.pad_image(batch, self.config.vae_scale_factor)
        return batch, padding, original_resolution

    # -- pictures --------------------------------------------------------------------------------------------

    @staticmethod
    def colormap(image, cmap: str = "Spectral", bytes: bool = False):
        """Colour values in [0, 1] (array or tensor, any shape; uint8 is read as /255) -> (..., 3) RGB of the
        same kind, floats in [0, 1] or, with ``bytes``, uint8. The map is piecewise linear between its
        control colours (Spectral: ColorBrewer's 11; binary: white to black); ``_r`` reverses it."""
        if not (torch.is_tensor(image) or isinstance(image, np.ndarray)):
            raise ValueError(f"colormap takes a numpy array or a torch tensor, got {type(image).__name__}")
        if cmap.removesuffix("_r") not in BUILT_IN_COLOR_MAPS:
            raise ValueError(f"color map {cmap!r} is not built in; use one of {', '.join(BUILT_IN_COLOR_MAPS)} "
                             f"(or their _r reversals)")
        as_numpy = isinstance(image, np.ndarray)
        values = torch.from_numpy(image) if as_numpy else image
        values = values.float() / 255 if values.dtype == torch.uint8 else values.float()
        colors = torch.tensor(color_map_points(cmap), dtype=torch.float32, device=values.device)
        position = values.clamp(0, 1) * (len(colors) - 1)
        left = position.long()
        right = (left + 1).clamp(max=len(colors) - 1)
        frac = (position - left.float()).unsqueeze(-1)
        out = (1 - frac) * colors[left] + frac * colors[right]
        if bytes:
            out = (out * 255).to(torch.uint8)  # truncates, as matplotlib's bytes=True does
        return out.numpy() if as_numpy else out

    @staticmethod
    def visualize_depth(depth, val_min: float = 0.0, val_max: float = 1.0,
                        color_map: str = "Spectral") -> list[PIL.Image.Image]:
        """Colour depth maps: a batch ((N, H, W, 1) array / (N, 1, H, W) tensor, or one 2-D map) or a list of
        2-D maps or 16-bit PIL images. ``[val_min, val_max]`` is stretched onto the colour map."""
        if val_max <= val_min:
            raise ValueError(f"val_max ({val_max}) must be greater than val_min ({val_min})")

        def one(index, item):
            if isinstance(item, PIL.Image.Image):
                if item.mode != "I;16":
                    raise ValueError(f"depth[{index}] is a PIL image of mode {item.mode}; only 16-bit depth PNGs "
                                     f"(mode I;16, as export_depth_to_16bit_png writes) can be read")
                item = np.array(item).astype(np.float32) / 65535
            item = _single_map(item, index, "depth")
            if isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if not torch.is_floating_point(item):
                raise ValueError(f"depth[{index}] has dtype {item.dtype}; pass floats")
            if (val_min, val_max) != (0.0, 1.0):
                item = (item - val_min) / (val_max - val_min)
            colored = MarigoldImageProcessor.colormap(item, cmap=color_map, bytes=True)
            return PIL.Image.fromarray(colored.cpu().numpy())

        return [one(i, item) for i, item in enumerate(_depth_maps(depth, "depth"))]

    @staticmethod
    def export_depth_to_16bit_png(depth, val_min: float = 0.0, val_max: float = 1.0) -> list[PIL.Image.Image]:
        """Depth maps (layouts as in :meth:`visualize_depth`, without PIL) -> 16-bit grayscale PIL images,
        ``[val_min, val_max]`` spread over 0..65535 (truncated)."""

        def one(index, item):
            if isinstance(item, PIL.Image.Image):
                raise ValueError(f"depth[{index}] is a PIL image; pass the predicted arrays or tensors")
            item = _single_map(item, index, "depth")
            if torch.is_tensor(item):
                item = item.cpu().numpy()
            if not np.issubdtype(item.dtype, np.floating):
                raise ValueError(f"depth[{index}] has dtype {item.dtype}; pass floats")
            if (val_min, val_max) != (0.0, 1.0):
                item = (item - val_min) / (val_max - val_min)
            # Little-endian 16 bits is what PIL calls I;16 (what PNG files of depth hold once loaded).
            return PIL.Image.fromarray((item * 65535).astype(np.uint16).astype("<u2"))

        return [one(i, item) for i, item in enumerate(_depth_maps(depth, "depth"))]

    @staticmethod
    def visualize_uncertainty(uncertainty, saturation_percentile=95) -> list[PIL.Image.Image]:
        """Grey pictures of uncertainty maps, white at the ``saturation_percentile``-th percentile and above."""

        def one(index, item):
            if isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if not torch.is_tensor(item) or item.ndim != 3:
                raise ValueError(f"uncertainty[{index}] must be a (C, H, W) tensor, got {_describe(item)}")
            if item.min() < 0:
                raise ValueError(f"uncertainty[{index}] has negative values (min {item.min().item():g})")
            values = item.permute(1, 2, 0).squeeze(2).cpu().numpy()
            saturation = np.percentile(values, saturation_percentile)
            return PIL.Image.fromarray(np.clip(values * 255 / saturation, 0, 255).astype(np.uint8))

        if uncertainty is None or isinstance(uncertainty, list) and any(u is None for u in uncertainty):
            raise ValueError("uncertainty is None: call the pipeline with ensemble_size > 1 and "
                             "output_uncertainty=True")
        if isinstance(uncertainty, (np.ndarray, torch.Tensor)):
            batch = MarigoldImageProcessor.expand_tensor_or_array(uncertainty)
            if isinstance(batch, np.ndarray):
                batch = MarigoldImageProcessor.numpy_to_pt(batch)
            if batch.ndim != 4 or batch.shape[1] not in (1, 3):
                raise ValueError(f"uncertainty has shape {tuple(batch.shape)}; expected (N, 1 or 3, H, W) "
                                 f"(or (N, H, W, 1 or 3) as an array)")
            return [one(i, item) for i, item in enumerate(batch)]
        if isinstance(uncertainty, list):
            return [one(i, item) for i, item in enumerate(uncertainty)]
        raise ValueError(f"uncertainty must be an array, a tensor or a list of them, got {_describe(uncertainty)}")


class MarigoldDepthPipeline(DiffusionPipeline):
    """Monocular depth (or disparity) from Marigold checkpoints, with diffusers' ``MarigoldDepthPipeline`` API.

    ``scale_invariant`` / ``shift_invariant`` describe what the model predicts (affine-invariant for Marigold
    depth) and decide how ensemble members are aligned; ``default_denoising_steps`` and
    ``default_processing_resolution`` fill ``num_inference_steps`` and ``processing_resolution`` when left None.
    """

    supported_prediction_types = ("depth", "disparity")

    def __init__(self, unet, vae, scheduler, text_encoder, tokenizer, prediction_type: str | None = None,
                 scale_invariant: bool | None = True, shift_invariant: bool | None = True,
                 default_denoising_steps: int | None = None, default_processing_resolution: int | None = None):
        super().__init__()
        if prediction_type not in self.supported_prediction_types:
            logger.warning("prediction_type=%r is not one of %s; results may not mean depth", prediction_type,
                           self.supported_prediction_types)
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(prediction_type=prediction_type, scale_invariant=scale_invariant,
                                shift_invariant=shift_invariant, default_denoising_steps=default_denoising_steps,
                                default_processing_resolution=default_processing_resolution)
        self.image_processor = MarigoldImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    def __getattr__(self, name):
        # The model-index settings read like attributes, as in diffusers (pipe.scale_invariant...).
        if name in ("prediction_type", "scale_invariant", "shift_invariant", "default_denoising_steps",
                    "default_processing_resolution"):
            return self.config[name]
        return super().__getattr__(name)

    @torch.no_grad()
    def __call__(self, image, num_inference_steps: int | None = None, ensemble_size: int = 1,
                 processing_resolution: int | None = None, match_input_resolution: bool = True,
                 resample_method_input: str = "bilinear", resample_method_output: str = "bilinear",
                 batch_size: int = 1, ensembling_kwargs: dict | None = None, latents: torch.Tensor | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                 output_uncertainty: bool = False, output_latent: bool = False, return_dict: bool = True,
                 hooks=()):
        """Predict depth for ``image``: a PIL image, an array ((H, W), (H, W, C) or (N, H, W, C)) or tensor
        ((H, W), (C, H, W) or (N, C, H, W)) with values in [0, 1] (uint8 is divided by 255), or a list of them,
        all of one size.

        ``ensemble_size`` members per image run through the UNet ``batch_size`` at a time. ``processing_resolution``:
        the longer side images are resized to (0 keeps their size; a multiple of the VAE factor).
        ``match_input_resolution`` resizes predictions back to the input size. ``ensembling_kwargs``:
        ``reduction`` ("median" or "mean"), ``regularizer_strength``, ``max_iter``, ``tol`` and ``max_res`` of
        :meth:`ensemble_depth`. ``latents`` (N * E, 4, h, w) replace the initial noise (``output_latent`` returns
        the final ones). ``hooks``: diffloom loop-hook objects for this call.
        """
        steps = self.default_denoising_steps if num_inference_steps is None else num_inference_steps
        resolution = self.default_processing_resolution if processing_resolution is None else processing_resolution
        num_images = self._check_call(image, steps, ensemble_size, resolution, resample_method_input,
                                      resample_method_output, batch_size, ensembling_kwargs, latents, generator,
                                      output_type, output_uncertainty)
        device, dtype = self.device, self.dtype
        text_embedding = self._empty_text_embedding(device).to(device=device, dtype=dtype)
        pixels, padding, original_resolution = self.image_processor.preprocess(image, resolution,
                                                                               resample_method_input, device, dtype)
        image_latent, pred_latent = self.prepare_latents(pixels, latents, generator, ensemble_size, batch_size)

        with self.start_call(hooks=hooks, batch_size=batch_size) as call:
            call.hook.on_call_start(pipe=self, call=call)
            # Members are denoised batch_size at a time, each batch through the whole schedule.
            finished = []
            for start in range(0, len(pred_latent), batch_size):
                chunk = pred_latent[start:start + batch_size]
                call.tensors["image_latents"] = image_latent[start:start + batch_size]
                call.tensors["empty_text_embeds"] = text_embedding.repeat(len(chunk), 1, 1)
                # Marigold hands a generator list to the scheduler whole, so a stochastic step (LCM's) draws
                # every batch's noise from the list's first len(chunk) generators; the slice keeps that order.
                step_generator = generator[:len(chunk)] if isinstance(generator, list) else generator
                call.settings["extra_step_kwargs"] = {"generator": step_generator}
                self.scheduler.set_timesteps(steps, device=device)
                finished.append(self.denoise(call, chunk, self.scheduler.timesteps))
            pred_latent = torch.cat(finished)

            prediction = torch.cat([self.decode_prediction(part) for part in pred_latent.split(batch_size)])
            prediction = call.fire_after_decode(prediction)
            prediction = self.image_processor.unpad_image(prediction, padding)

            uncertainty = None
            if ensemble_size > 1:
                groups = prediction.reshape(num_images, ensemble_size, *prediction.shape[1:])
                merged = [self.ensemble_depth(group, self.scale_invariant, self.shift_invariant, output_uncertainty,
                                              **(ensembling_kwargs or {})) for group in groups]
                prediction = torch.cat([depth for depth, _ in merged])
                uncertainty = torch.cat([spread for _, spread in merged]) if output_uncertainty else None

            if match_input_resolution:
                resize = self.image_processor.resize_antialias
                prediction = resize(prediction, original_resolution, resample_method_output, is_aa=False)
                if uncertainty is not None:
                    uncertainty = resize(uncertainty, original_resolution, resample_method_output, is_aa=False)
            if output_type == "np":
                prediction = self.image_processor.pt_to_numpy(prediction)
                uncertainty = self.image_processor.pt_to_numpy(uncertainty) if uncertainty is not None else None
            result = (prediction, uncertainty, pred_latent if output_latent else None)
            output = MarigoldDepthOutput(*result)
            call.hook.on_call_end(pipe=self, call=call, output=output)
        return output if return_dict else result

    # -- the denoising steps -----------------------------------------------------------------------------------

    def prepare_model_input(self, call, step):
        # Image latent first, depth latent second: the channel order the UNet was fine-tuned with. DDIM and LCM
        # need no input scaling, and Marigold applies none.
        step.model_input = torch.cat([call.tensors["image_latents"], step.latents], dim=1)
        step.model_timestep = step.timestep
        step.conditioning = {"encoder_hidden_states": call.tensors["empty_text_embeds"]}

    def run_denoiser(self, call, step):
        return self.unet(step.model_input, step.model_timestep, **step.conditioning).sample

    # -- pieces ------------------------------------------------------------------------------------------------

    def _empty_text_embedding(self, device) -> torch.Tensor:
        ids = self.tokenizer("", padding="do_not_pad", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def prepare_latents(self, image: torch.Tensor, latents: torch.Tensor | None, generator, ensemble_size: int,
                        batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image latents repeated per member, initial depth latents): both (N * E, 4, h, w). The VAE's mode is
        used, not a sample: the image condition must not be noisy."""
        encoded = torch.cat([self.vae.encode(part).latent_dist.mode() for part in image.split(batch_size)])
        image_latent = (encoded * self.vae.config.scaling_factor).repeat_interleave(ensemble_size, dim=0)
        if latents is None:
            latents = randn_tensor(image_latent.shape, generator=generator, device=image_latent.device,
                                   dtype=image_latent.dtype)
        return image_latent, latents

    def decode_prediction(self, pred_latent: torch.Tensor) -> torch.Tensor:
        """Depth latents (B, 4, h, w) -> depth (B, 1, H, W) in [0, 1]: the mean of the decoded channels."""
        channels = self.vae.config.latent_channels
        if pred_latent.dim() != 4 or pred_latent.shape[1] != channels:
            raise ValueError(f"decode_prediction takes latents of shape (B, {channels}, h, w), got "
                             f"{tuple(pred_latent.shape)}")
        decoded = self.vae.decode(pred_latent / self.vae.config.scaling_factor).sample
        return (decoded.mean(dim=1, keepdim=True).clip(-1.0, 1.0) + 1.0) / 2.0

    @staticmethod
    def ensemble_depth(depth: torch.Tensor, scale_invariant: bool = True, shift_invariant: bool = True,
                       output_uncertainty: bool = False, reduction: str = "median",
                       regularizer_strength: float = 0.02, max_iter: int = 2, tol: float = 1e-3,
                       max_res: int | None = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Merge the (E, 1, H, W) members of one prediction into a (1, 1, H, W) map in [0, 1] (and its
        uncertainty, in the same units, if asked).

        Affine-invariant members get a scale s_i and shift t_i (scale-invariant ones a scale only), found with
        scipy's BFGS (numerical gradients, at most ``max_iter`` iterations, gradient tolerance ``tol``) on maps
        nearest-resized to at most ``max_res`` pixels on their longer side. The cost is the sum over member
        pairs of the RMS difference of the aligned maps, plus ``regularizer_strength`` times how far the merged
        map's minimum and maximum are from 0 and 1 (without it, shrinking every map to a point would be best).
        The merged map is the per-pixel median (uncertainty: median absolute deviation) or mean (uncertainty:
        standard deviation), then stretched onto [0, 1] (for scale-invariant maps: divided by its maximum).
        """
        if depth.dim() != 4 or depth.shape[1] != 1:
            raise ValueError(f"ensemble_depth takes members of shape (E, 1, H, W), got {tuple(depth.shape)}")
        if reduction not in ("mean", "median"):
            raise ValueError(f"ensembling_kwargs['reduction']={reduction!r}: use 'mean' or 'median'")
        if not scale_invariant:
            raise ValueError("ensembling needs scale_invariant=True: aligning members by a shift alone, or "
                             "merging absolute predictions, is not supported; use ensemble_size=1")
        members = depth.shape[0]
        pairs = torch.combinations(torch.arange(members)).tolist()

        def align(maps, params):
            params = torch.from_numpy(params).to(maps).view(-1, 1, 1, 1)
            if shift_invariant:
                return maps * params[:members] + params[members:]
            return maps * params

        def merge(aligned, with_spread):
            if reduction == "mean":
                merged = aligned.mean(dim=0, keepdim=True)
                return merged, aligned.std(dim=0, keepdim=True) if with_spread else None
            merged = aligned.median(dim=0, keepdim=True).values
            return merged, (aligned - merged).abs().median(dim=0, keepdim=True).values if with_spread else None

        def cost(params, maps):
            aligned = align(maps, params)
            # Summed as Python floats, pair by pair: BFGS differentiates this numerically, so it is kept exact.
            total = 0.0
            for i, j in pairs:
                total += (aligned[i] - aligned[j]).pow(2).mean().sqrt().item()
            if regularizer_strength > 0:
                merged, _ = merge(aligned, False)
                total += (merged.min().abs().item() + (1.0 - merged.max()).abs().item()) * regularizer_strength
            return total

        try:
            from scipy.optimize import minimize
        except ImportError as e:
            raise ImportError("ensembling (ensemble_size > 1) aligns members with scipy.optimize: "
                              "pip install scipy") from e
        maps = depth.to(torch.float32)
        if max_res is not None and max(maps.shape[2:]) > max_res:
            maps = MarigoldImageProcessor.resize_to_max_edge(maps, max_res, "nearest-exact")
        flat = maps.reshape(members, -1)
        low, high = flat.min(dim=1).values, flat.max(dim=1).values
        # Start from every member stretched onto [0, 1] (scale-invariant: its maximum moved to 1).
        if shift_invariant:
            scale = 1.0 / (high - low).clamp(min=1e-6)
            start = torch.cat((scale, -scale * low))
        else:
            start = 1.0 / high.clamp(min=1e-6)
        params = minimize(cost, start.cpu().numpy().astype(np.float64), args=(maps,), method="BFGS", tol=tol,
                          options={"maxiter": max_iter}).x

        merged, spread = merge(align(depth, params), output_uncertainty)
        low = merged.min() if shift_invariant else 0
        span = (merged.max() - low).clamp(min=1e-6)
        return (merged - low) / span, spread / span if spread is not None else None

    def _check_call(self, image, steps, ensemble_size, resolution, resample_method_input, resample_method_output,
                    batch_size, ensembling_kwargs, latents, generator, output_type, output_uncertainty) -> int:
        """Validate a call's arguments; returns the number of images."""
        if self.image_processor.config.vae_scale_factor != self.vae_scale_factor:
            raise ValueError(f"pipe.image_processor pads to multiples of {self.image_processor.config.vae_scale_factor}"
                             f" but the VAE downsamples {self.vae_scale_factor}x: set pipe.image_processor = "
                             f"MarigoldImageProcessor(vae_scale_factor={self.vae_scale_factor})")
        if steps is None:
            raise ValueError("num_inference_steps is None and the model index has no default_denoising_steps: "
                             "pass num_inference_steps")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if ensemble_size == 2:
            logger.warning("ensemble_size=2 gives about what no ensembling gives; use 3 or more")
        if ensemble_size > 1 and not self.scale_invariant:
            raise ValueError(f"ensemble_size={ensemble_size} needs a scale-invariant model (scale_invariant=True "
                             f"in model_index.json): shift-only or absolute predictions are not ensembled; use "
                             f"ensemble_size=1")
        if ensemble_size > 1 and importlib.util.find_spec("scipy") is None:
            raise ImportError("ensembling (ensemble_size > 1) aligns members with scipy.optimize: pip install scipy")
        if ensemble_size == 1 and output_uncertainty:
            raise ValueError("output_uncertainty=True needs ensemble_size > 1: the uncertainty is the members' "
                             "spread")
        if resolution is None:
            raise ValueError("processing_resolution is None and the model index has no "
                             "default_processing_resolution: pass processing_resolution (0 keeps the input size)")
        if resolution < 0:
            raise ValueError(f"processing_resolution must be >= 0 (0 keeps the input size), got {resolution}")
        if resolution % self.vae_scale_factor != 0:
            raise ValueError(f"processing_resolution={resolution} must be a multiple of {self.vae_scale_factor}, "
                             f"the VAE's downsampling factor")
        for name, mode in (("resample_method_input", resample_method_input),
                           ("resample_method_output", resample_method_output)):
            if mode not in RESAMPLE_MODES:
                raise ValueError(f"{name}={mode!r} is not one of {', '.join(RESAMPLE_MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type={output_type!r}: use 'np' or 'pt'")
        if latents is not None and generator is not None:
            raise ValueError("pass latents or generator, not both: latents replace the noise a generator draws")
        if ensembling_kwargs is not None:
            if not isinstance(ensembling_kwargs, dict):
                raise ValueError(f"ensembling_kwargs must be a dict, got {type(ensembling_kwargs).__name__}")
            if ensembling_kwargs.get("reduction", "median") not in ("mean", "median"):
                raise ValueError(f"ensembling_kwargs['reduction']={ensembling_kwargs['reduction']!r}: use 'mean' "
                                 f"or 'median'")
            unknown = sorted(set(ensembling_kwargs) - set(ENSEMBLING_KEYS))
            if unknown and ensemble_size > 1:
                raise TypeError(f"ensembling_kwargs has unknown keys {unknown}; known: {', '.join(ENSEMBLING_KEYS)}")

        num_images, size = 0, None
        for i, item in enumerate(image if isinstance(image, list) else [image]):
            count, item_size = _count_and_size(item, f"image[{i}]" if isinstance(image, list) else "image")
            if size is not None and item_size != size:
                raise ValueError(f"image[{i}] is {item_size} (H, W) but image[0] is {size}: all images of one call "
                                 f"must share their size")
            num_images, size = num_images + count, item_size

        if latents is not None:
            if not torch.is_tensor(latents):
                raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
            height, width = size if resolution == 0 else _scaled_size(*size, resolution)
            factor = self.vae_scale_factor
            expected = (num_images * ensemble_size, self.vae.config.latent_channels, -(-height // factor),
                        -(-width // factor))
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; {num_images} image(s) x "
                                 f"ensemble_size={ensemble_size} at this processing_resolution need {expected}")
        if isinstance(generator, list):
            if len(generator) != num_images * ensemble_size:
                raise ValueError(f"got {len(generator)} generators; pass one per member of every image "
                                 f"({num_images} x {ensemble_size}) or a single generator")
            if len({g.device.type for g in generator}) > 1:
                raise ValueError("the generators are on different device types; put them all on one")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got "
                             f"{type(generator).__name__}")
        return num_images


# -- helpers -------------------------------------------------------------------------------------------------------


def _scaled_size(height: int, width: int, max_edge: int) -> tuple[int, int]:
    """(H, W) scaled so the longer side is ``max_edge``, rounded down."""
    longer = max(height, width)
    new = (height * max_edge // longer, width * max_edge // longer)
    if 0 in new:
        raise ValueError(f"an image of {width} x {height} (W x H) is too elongated to resize to a longer side of "
                         f"{max_edge}: one side would vanish")
    return new


def _count_and_size(item, label: str) -> tuple[int, tuple[int, int]]:
    """How many images an input holds and their (H, W): arrays are channels-last, tensors channels-first."""
    if isinstance(item, PIL.Image.Image):
        return 1, (item.height, item.width)
    if not isinstance(item, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{label} is a {type(item).__name__}; pass PIL images, numpy arrays or tensors")
    if item.ndim not in (2, 3, 4):
        raise ValueError(f"{label} has shape {tuple(item.shape)}; pass 2, 3 or 4 dimensions")
    height_axis = -3 if isinstance(item, np.ndarray) and item.ndim > 2 else -2
    count = item.shape[0] if item.ndim == 4 else 1
    return count, (int(item.shape[height_axis]), int(item.shape[height_axis + 1]))


def _check_array_dtype(array: np.ndarray) -> None:
    kind = array.dtype
    if np.issubdtype(kind, np.bool_) or np.issubdtype(kind, np.complexfloating) or (
            np.issubdtype(kind, np.integer) and not np.issubdtype(kind, np.unsignedinteger)):
        raise ValueError(f"an image array of dtype {kind} is not supported: pass unsigned integers (uint8, "
                         f"uint16) or floats in [0, 1]")


def _check_float_batch(image, dims: int | None = 4) -> None:
    if not torch.is_tensor(image) or not torch.is_floating_point(image):
        raise ValueError(f"expected a floating-point tensor, got {_describe(image)}")
    if dims is not None and image.dim() != dims:
        raise ValueError(f"expected a (N, C, H, W) tensor, got shape {tuple(image.shape)}")


def _describe(value) -> str:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _depth_maps(depth, what: str) -> list:
    """A batch or a list of depth maps -> a list of single maps (2-D, or PIL images left for the caller)."""
    if depth is None or isinstance(depth, list) and any(d is None for d in depth):
        raise ValueError(f"{what} is None: pass the pipeline's prediction")
    if isinstance(depth, (np.ndarray, torch.Tensor)):
        batch = MarigoldImageProcessor.expand_tensor_or_array(depth)
        if isinstance(batch, np.ndarray):
            batch = MarigoldImageProcessor.numpy_to_pt(batch)
        if batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"{what} has shape {tuple(batch.shape)}; expected (N, 1, H, W) (or (N, H, W, 1) as an "
                             f"array)")
        return [item[0] for item in batch]
    if isinstance(depth, list):
        return depth
    raise ValueError(f"{what} must be an array, a tensor or a list of them, got {_describe(depth)}")


def _single_map(item, index, what: str):
    if not isinstance(item, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{what}[{index}] must be an array or a tensor, got {_describe(item)}")
    if item.ndim != 2:
        raise ValueError(f"{what}[{index}] has shape {tuple(item.shape)}; each map must be 2-D (H, W)")
    return item
