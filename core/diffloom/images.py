"""Images in and out of pipelines: loading, grids, and the VAE image processor.

:class:`VaeImageProcessor` turns what users pass (PIL images, numpy arrays in [0, 1] shaped HWC/NHWC, torch
tensors in [0, 1] shaped CHW/NCHW, or lists of them) into the NCHW float tensor a VAE encodes, and turns decoded
tensors back into PIL images, numpy arrays or tensors. It reproduces diffusers' processor value for value: the
same resampling filters, the same rounding when sizes are snapped to the VAE's downsampling factor, the same
handling of masks (grayscale, binarised at 0.5, not normalised) and of ``padding_mask_crop``.
"""

from __future__ import annotations

import io
import os
import urllib.request
import warnings
from typing import Callable, Union

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch
import torch.nn.functional as F

from .configuration import ConfigMixin, register_to_config

PipelineImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor,
                           list[PIL.Image.Image], list[np.ndarray], list[torch.Tensor]]

RESAMPLING = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "linear": PIL.Image.Resampling.BILINEAR,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
URL_TIMEOUT_S = 60


def load_image(image, convert_method: Callable[[PIL.Image.Image], PIL.Image.Image] | None = None) -> PIL.Image.Image:
    """A PIL image from a path, an http(s) URL or a PIL image, turned upright by its EXIF orientation.

    The result is RGB unless ``convert_method`` is given, which then does the conversion instead.
    """
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if isinstance(image, str):
        if image.startswith(("http://", "https://")):
            with urllib.request.urlopen(image, timeout=URL_TIMEOUT_S) as response:
                image = PIL.Image.open(io.BytesIO(response.read()))
        elif os.path.isfile(image):
            image = PIL.Image.open(image)
        else:
            raise ValueError(f"load_image: {image!r} is neither an existing file nor an http(s):// URL")
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(f"load_image takes a path, a URL or a PIL image, not {type(image).__name__}")
    image = PIL.ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")


def make_image_grid(images: list[PIL.Image.Image], rows: int, cols: int, resize: int | None = None) -> PIL.Image.Image:
    """Paste ``rows * cols`` images into one, row by row; ``resize`` makes each a ``resize`` square first."""
    if len(images) != rows * cols:
        raise ValueError(f"make_image_grid got {len(images)} images for a {rows}x{cols} grid; pass rows * cols images")
    if resize is not None:
        images = [im.resize((resize, resize)) for im in images]
    w, h = images[0].size
    grid = PIL.Image.new("RGB", size=(cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, box=(i % cols * w, i // cols * h))
    return grid


# -- conversions between PIL, numpy (NHWC in [0, 1]) and torch (NCHW) -----------------------------------------


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(im[..., 0]) for im in images]
    return [PIL.Image.fromarray(im) for im in images]


def pil_to_numpy(images) -> np.ndarray:
    if not isinstance(images, list):
        images = [images]
    return np.stack([np.array(im).astype(np.float32) / 255.0 for im in images], axis=0)


def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
    if images.ndim == 3:  # a batch of single-channel images
        images = images[..., None]
    return torch.from_numpy(images.transpose(0, 3, 1, 2))


def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def is_valid_image(image) -> bool:
    """A PIL image, or one image as a 2-D (grayscale) or 3-D array/tensor."""
    if isinstance(image, PIL.Image.Image):
        return True
    return isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim in (2, 3)


def is_valid_image_imagelist(images) -> bool:
    """One image, a batch (4-D array/tensor) or a list of images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return True
    if is_valid_image(images):
        return True
    return isinstance(images, list) and all(is_valid_image(im) for im in images)


class VaeImageProcessor(ConfigMixin):
    """Pre- and post-processing of images for a VAE.

    ``do_resize`` snaps sizes down to multiples of ``vae_scale_factor``; ``do_normalize`` maps [0, 1] to
    [-1, 1]; ``do_binarize`` thresholds at 0.5 (masks); ``do_convert_rgb`` / ``do_convert_grayscale`` convert
    PIL inputs. Tensors with ``vae_latent_channels`` channels are taken to be latents and pass through.
    """

    config_name = "config.json"

    numpy_to_pil = staticmethod(numpy_to_pil)
    pil_to_numpy = staticmethod(pil_to_numpy)
    numpy_to_pt = staticmethod(numpy_to_pt)
    pt_to_numpy = staticmethod(pt_to_numpy)

    @register_to_config
    def __init__(self, do_resize: bool = True, vae_scale_factor: int = 8, vae_latent_channels: int = 4,
                 resample: str = "lanczos", reducing_gap: int | None = None, do_normalize: bool = True,
                 do_binarize: bool = False, do_convert_rgb: bool = False, do_convert_grayscale: bool = False):
        if do_convert_rgb and do_convert_grayscale:
            raise ValueError("VaeImageProcessor: do_convert_rgb and do_convert_grayscale cannot both be True; "
                             "set the one you do not want to False")
        if resample not in RESAMPLING:
            raise ValueError(f"VaeImageProcessor: resample={resample!r} is not one of {sorted(RESAMPLING)}")

    # -- elementary operations ---------------------------------------------------------------------------------

    @staticmethod
    def normalize(images):
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images):
        return (images * 0.5 + 0.5).clamp(0, 1)

    @staticmethod
    def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
        return image.convert("L")

    @staticmethod
    def blur(image: PIL.Image.Image, blur_factor: int = 4) -> PIL.Image.Image:
        """Soften a mask's edges with a Gaussian blur of radius ``blur_factor``."""
        return image.filter(PIL.ImageFilter.GaussianBlur(blur_factor))

    @staticmethod
    def binarize(image: torch.Tensor) -> torch.Tensor:
        return torch.where(image < 0.5, torch.zeros_like(image), torch.ones_like(image))

    # -- sizes -------------------------------------------------------------------------------------------------

    def get_default_height_width(self, image, height: int | None = None, width: int | None = None):
        """``(height, width)`` given or read from ``image``, rounded down to multiples of the VAE factor."""
        if isinstance(image, PIL.Image.Image):
            own_h, own_w = image.height, image.width
        elif isinstance(image, torch.Tensor):  # NCHW
            own_h, own_w = image.shape[2], image.shape[3]
        else:  # numpy NHWC
            own_h, own_w = image.shape[1], image.shape[2]
        height = own_h if height is None else height
        width = own_w if width is None else width
        factor = self.config.vae_scale_factor
        return height - height % factor, width - width % factor

    def resize(self, image, height: int, width: int, resize_mode: str = "default"):
        """Resize to exactly ``height`` x ``width``.

        ``default`` stretches; ``fill`` keeps the aspect ratio, centres, and fills the margins by stretching
        the image's edge rows/columns; ``crop`` keeps the aspect ratio, centres and crops the excess. ``fill``
        and ``crop`` take PIL images only. Arrays and tensors are resized with nearest-neighbour sampling.
        """
        if resize_mode not in ("default", "fill", "crop"):
            raise ValueError(f"resize_mode={resize_mode!r} is not one of 'default', 'fill', 'crop'")
        if resize_mode != "default" and not isinstance(image, PIL.Image.Image):
            raise ValueError(f"resize_mode={resize_mode!r} needs PIL images, got {type(image).__name__}; "
                             f"use resize_mode='default' for arrays and tensors")
        if isinstance(image, PIL.Image.Image):
            if resize_mode == "fill":
                return self._resize_and_fill(image, width, height)
            if resize_mode == "crop":
                return self._resize_and_crop(image, width, height)
            return image.resize((width, height), resample=RESAMPLING[self.config.resample],
                                reducing_gap=self.config.reducing_gap)
        if isinstance(image, torch.Tensor):
            return F.interpolate(image, size=(height, width))
        return pt_to_numpy(F.interpolate(numpy_to_pt(image), size=(height, width)))

    def _resize_and_fill(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        wider = width / height < image.width / image.height  # the source is wider than the target
        taller = width / height > image.width / image.height
        src_w = width if wider else image.width * height // image.height
        src_h = height if not wider else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=RESAMPLING[self.config.resample])
        out = PIL.Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if wider:
            # Bands above and below: stretch the first and last rows over them.
            band = height // 2 - src_h // 2
            if band > 0:
                out.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                          box=(0, band + src_h))
        elif taller:
            band = width // 2 - src_w // 2
            if band > 0:
                out.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                          box=(band + src_w, 0))
        return out

    def _resize_and_crop(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        narrower = width / height > image.width / image.height  # the source is narrower than the target
        src_w = width if narrower else image.width * height // image.height
        src_h = height if not narrower else image.height * width // image.width
        resized = image.resize((src_w, src_h), resample=RESAMPLING[self.config.resample])
        out = PIL.Image.new("RGB", (width, height))
        out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out

    # -- inpainting with padding_mask_crop ---------------------------------------------------------------------

    @staticmethod
    def get_crop_region(mask_image: PIL.Image.Image, width: int, height: int, pad: int = 0):
        """``(x1, y1, x2, y2)``: the box around the mask's non-zero pixels, grown by ``pad`` and then widened
        (or heightened) to the ``width / height`` aspect ratio, kept inside the image."""
        mask = np.array(mask_image.convert("L"))
        h, w = mask.shape
        cols = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        if cols.size == 0:
            raise ValueError("padding_mask_crop needs a mask with at least one non-black pixel")
        x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
        x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)

        target_ratio = width / height
        if (x2 - x1) / (y2 - y1) > target_ratio:
            grow = int((x2 - x1) / target_ratio - (y2 - y1))
            y1, y2 = _grow_span(y1, y2, grow, h)
        else:
            grow = int((y2 - y1) * target_ratio - (x2 - x1))
            x1, x2 = _grow_span(x1, x2, grow, w)
        return x1, y1, x2, y2

    def apply_overlay(self, mask: PIL.Image.Image, init_image: PIL.Image.Image, image: PIL.Image.Image,
                      crop_coords=None) -> PIL.Image.Image:
        """Put the generated ``image`` back into ``init_image``: only where ``mask`` is white does it show.

        With ``crop_coords`` the generated image covers only that box of the original (it is resized into it).
        """
        width, height = init_image.width, init_image.height
        # The original's unmasked part, as premultiplied RGBA with the inverted mask for alpha.
        kept = PIL.Image.new("RGBa", (width, height))
        kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=PIL.ImageOps.invert(mask.convert("L")))
        kept = kept.convert("RGBA")
        if crop_coords is not None:
            x, y, x2, y2 = crop_coords
            canvas = PIL.Image.new("RGBA", (width, height))
            canvas.paste(self.resize(image, height=y2 - y, width=x2 - x, resize_mode="crop"), (x, y))
            image = canvas.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(kept)
        return image.convert("RGB")

    # -- the two directions ------------------------------------------------------------------------------------

    def preprocess(self, image: PipelineImageInput, height: int | None = None, width: int | None = None,
                   resize_mode: str = "default", crops_coords=None) -> torch.Tensor:
        """An NCHW float tensor ready for the VAE (in [-1, 1] when ``do_normalize``)."""
        config = self.config
        if config.do_convert_grayscale and isinstance(image, (torch.Tensor, np.ndarray)) and image.ndim == 3:
            # A 3-D mask is a batch of 2-D masks (or, for numpy, one HW1 mask): give it its channel axis.
            if isinstance(image, torch.Tensor):
                image = image.unsqueeze(1)
            elif image.shape[-1] == 1:
                image = image[None]
            else:
                image = image[..., None]
        if isinstance(image, list) and image and isinstance(image[0], np.ndarray) and image[0].ndim == 4:
            warnings.warn("passing image as a list of 4-D arrays is deprecated; concatenate them into one "
                          "4-D array", FutureWarning, stacklevel=2)
            image = np.concatenate(image, axis=0)
        if isinstance(image, list) and image and isinstance(image[0], torch.Tensor) and image[0].ndim == 4:
            warnings.warn("passing image as a list of 4-D tensors is deprecated; concatenate them into one "
                          "4-D tensor", FutureWarning, stacklevel=2)
            image = torch.cat(image, dim=0)
        if not is_valid_image_imagelist(image) or (isinstance(image, list) and not image):
            raise ValueError(f"image must be a PIL image, a numpy array, a torch tensor or a list of them, not "
                             f"{_describe(image)}")
        if not isinstance(image, list):
            image = [image]

        if isinstance(image[0], PIL.Image.Image):
            if crops_coords is not None:
                image = [im.crop(crops_coords) for im in image]
            if config.do_resize:
                height, width = self.get_default_height_width(image[0], height, width)
                image = [self.resize(im, height, width, resize_mode=resize_mode) for im in image]
            if config.do_convert_rgb:
                image = [self.convert_to_rgb(im) for im in image]
            elif config.do_convert_grayscale:
                image = [self.convert_to_grayscale(im) for im in image]
            image = numpy_to_pt(pil_to_numpy(image))
        elif isinstance(image[0], np.ndarray):
            image = numpy_to_pt(np.concatenate(image, axis=0) if image[0].ndim == 4 else np.stack(image, axis=0))
            height, width = self.get_default_height_width(image, height, width)
            if config.do_resize:
                image = self.resize(image, height, width)
        else:
            image = torch.cat(image, dim=0) if image[0].ndim == 4 else torch.stack(image, dim=0)
            if config.do_convert_grayscale and image.ndim == 3:
                image = image.unsqueeze(1)
            if image.shape[1] == config.vae_latent_channels:
                return image  # already latents
            height, width = self.get_default_height_width(image, height, width)
            if config.do_resize:
                image = self.resize(image, height, width)

        do_normalize = config.do_normalize
        if do_normalize and image.min() < 0:
            warnings.warn(f"image values should be in [0, 1], but they span [{image.min()}, {image.max()}]; they "
                          f"are taken to be in [-1, 1] already and left unnormalized (this is deprecated)",
                          FutureWarning, stacklevel=2)
            do_normalize = False
        if do_normalize:
            image = self.normalize(image)
        if config.do_binarize:
            image = self.binarize(image)
        return image

    def postprocess(self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None):
        """Decoded NCHW tensor -> ``output_type``: "pil" (list), "np" (NHWC in [0, 1]), "pt" (NCHW in
        [0, 1]) or "latent" (unchanged). ``do_denormalize`` says per image whether to map [-1, 1] to [0, 1]."""
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"postprocess takes an NCHW torch tensor, not {type(image).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        if output_type == "latent":
            return image
        if do_denormalize is None:
            image = self.denormalize(image) if self.config.do_normalize else image
        else:
            image = torch.stack([self.denormalize(im) if flag else im for im, flag in zip(image, do_denormalize)])
        if output_type == "pt":
            return image
        image = pt_to_numpy(image)
        return image if output_type == "np" else numpy_to_pil(image)


def _grow_span(lo: int, hi: int, grow: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) by ``grow`` pixels split around it, then shift it back inside [0, limit]."""
    lo -= grow // 2
    hi += grow - grow // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def _describe(value) -> str:
    if isinstance(value, list):
        return f"a list of {', '.join(sorted({type(v).__name__ for v in value})) or 'nothing'}"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"a {value.ndim}-D {type(value).__name__}"
    return type(value).__name__
