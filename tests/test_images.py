"""diffloom.images against diffusers' image processor and loading helpers, value for value."""

import contextlib
import http.server
import threading
import warnings
from functools import partial

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor as RefProcessor
from diffusers.utils import load_image as ref_load_image
from diffusers.utils import make_image_grid as ref_make_image_grid

from diffloom.images import VaeImageProcessor, load_image, make_image_grid, numpy_to_pil, pil_to_numpy


def pil(h=20, w=30, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (h, w) if channels is None else (h, w, channels)
    return PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode)


def same(a, b):
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
        return
    if isinstance(a, PIL.Image.Image):
        assert a.mode == b.mode and a.size == b.size
        a, b = np.asarray(a), np.asarray(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype
        a, b = a.numpy(), b.numpy()
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def processors(**config):
    return VaeImageProcessor(**config), RefProcessor(**config)


IMAGE_INPUTS = {
    "pil": lambda: pil(),
    "pil-list": lambda: [pil(seed=1), pil(seed=2)],
    "pil-rgba": lambda: pil(mode="RGBA"),
    "np-hwc": lambda: np.random.default_rng(0).random((20, 30, 3), dtype=np.float32),
    "np-nhwc": lambda: np.random.default_rng(0).random((2, 20, 30, 3), dtype=np.float32),
    "np-list": lambda: [np.random.default_rng(i).random((20, 30, 3), dtype=np.float32) for i in range(2)],
    "pt-chw": lambda: torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0)),
    "pt-nchw": lambda: torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(0)),
    "pt-list": lambda: [torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)],
    "pt-latents": lambda: torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0)),
    "pt-minus-one": lambda: torch.rand(1, 3, 16, 16) * 2 - 1,
}


@pytest.mark.parametrize("name", IMAGE_INPUTS)
@pytest.mark.parametrize("size", [(None, None), (24, 40)])
def test_preprocess_images(name, size):
    ours, ref = processors(vae_scale_factor=8)
    image = IMAGE_INPUTS[name]()
    with pytest.warns(FutureWarning) if name == "pt-minus-one" else contextlib.nullcontext():
        got = ours.preprocess(image, height=size[0], width=size[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.preprocess(image, height=size[0], width=size[1])
    same(got, want)


MASK_INPUTS = {
    "pil-l": lambda: pil(mode="L"),
    "pil-rgb": lambda: pil(),
    "np-hw": lambda: np.random.default_rng(0).random((20, 30), dtype=np.float32),
    "np-hw1": lambda: np.random.default_rng(0).random((20, 30, 1), dtype=np.float32),
    "np-nhw": lambda: np.random.default_rng(0).random((2, 20, 30), dtype=np.float32),
    "pt-hw": lambda: torch.rand(20, 30, generator=torch.Generator().manual_seed(0)),
    "pt-nhw": lambda: torch.rand(2, 20, 30, generator=torch.Generator().manual_seed(0)),
    "pt-n1hw": lambda: torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("name", MASK_INPUTS)
def test_preprocess_masks(name):
    config = dict(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    ours, ref = processors(**config)
    mask = MASK_INPUTS[name]()
    got, want = ours.preprocess(mask, height=16, width=24), ref.preprocess(mask, height=16, width=24)
    same(got, want)
    assert set(got.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("mode", ["fill", "crop"])
@pytest.mark.parametrize("source", [(20, 60), (60, 20), (32, 48), (48, 32)])
@pytest.mark.parametrize("target", [(32, 48), (48, 32), (40, 40)])
def test_resize_modes(mode, source, target):
    ours, ref = processors(vae_scale_factor=8)
    image = pil(*source, seed=3)
    same(ours.resize(image, *target, resize_mode=mode), ref.resize(image, *target, resize_mode=mode))
    same(ours.preprocess(image, *target, resize_mode=mode), ref.preprocess(image, *target, resize_mode=mode))


@pytest.mark.parametrize("resample", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_resample_and_arrays(resample):
    ours, ref = processors(vae_scale_factor=8, resample=resample)
    same(ours.resize(pil(), 16, 24), ref.resize(pil(), 16, 24))
    array = np.random.default_rng(1).random((2, 20, 30, 3), dtype=np.float32)
    same(ours.resize(array, 16, 24), ref.resize(array, 16, 24))


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
@pytest.mark.parametrize("do_denormalize", [None, [True, False]])
def test_postprocess(output_type, do_denormalize):
    ours, ref = processors(vae_scale_factor=8)
    decoded = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2
    same(ours.postprocess(decoded, output_type, do_denormalize), ref.postprocess(decoded, output_type, do_denormalize))


def test_postprocess_errors():
    ours = VaeImageProcessor()
    with pytest.raises(ValueError, match="output_type"):
        ours.postprocess(torch.zeros(1, 3, 8, 8), output_type="jpg")
    with pytest.raises(ValueError, match="tensor"):
        ours.postprocess(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="image must be"):
        ours.preprocess("not an image")
    with pytest.raises(ValueError, match="resize_mode"):
        ours.resize(np.zeros((1, 8, 8, 3)), 8, 8, resize_mode="fill")
    with pytest.raises(ValueError, match="both"):
        VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True)


def test_conversions():
    batch = np.random.default_rng(0).random((2, 5, 6, 3), dtype=np.float32)
    same(numpy_to_pil(batch), RefProcessor.numpy_to_pil(batch))
    same(numpy_to_pil(batch[..., :1]), RefProcessor.numpy_to_pil(batch[..., :1]))
    same(pil_to_numpy([pil(), pil(seed=1)]), RefProcessor.pil_to_numpy([pil(), pil(seed=1)]))
    same(VaeImageProcessor.numpy_to_pt(batch), RefProcessor.numpy_to_pt(batch))
    same(VaeImageProcessor.pt_to_numpy(torch.from_numpy(batch)), RefProcessor.pt_to_numpy(torch.from_numpy(batch)))


def _mask(h, w, box):
    m = np.zeros((h, w), dtype=np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = 255
    return PIL.Image.fromarray(m)


@pytest.mark.parametrize("box", [(10, 5, 20, 9), (0, 0, 4, 30), (35, 2, 40, 30), (12, 12, 14, 14)])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("target", [(48, 32), (32, 48)])
def test_crop_region_and_overlay(box, pad, target):
    ours, ref = processors(vae_scale_factor=8)
    mask = _mask(30, 40, box)
    region = ours.get_crop_region(mask, *target, pad=pad)
    assert region == ref.get_crop_region(mask, *target, pad=pad)
    init, generated = pil(30, 40, seed=4), pil(target[1], target[0], seed=5)
    same(ours.apply_overlay(mask, init, generated, region), ref.apply_overlay(mask, init, generated, region))
    same(ours.apply_overlay(mask, init, pil(30, 40, seed=6)), ref.apply_overlay(mask, init, pil(30, 40, seed=6)))


def test_blur_and_empty_mask():
    ours, ref = processors()
    mask = _mask(30, 40, (10, 10, 20, 20))
    same(ours.blur(mask, blur_factor=3), ref.blur(mask, blur_factor=3))
    with pytest.raises(ValueError, match="non-black"):
        ours.get_crop_region(_mask(30, 40, (0, 0, 0, 0)), 32, 32)


def test_make_image_grid():
    images = [pil(10, 12, seed=i) for i in range(6)]
    same(make_image_grid(images, 2, 3), ref_make_image_grid(images, 2, 3))
    same(make_image_grid(images, 3, 2, resize=8), ref_make_image_grid(images, 3, 2, resize=8))
    with pytest.raises(ValueError, match="2x2"):
        make_image_grid(images, 2, 2)


@pytest.fixture
def exif_png(tmp_path):
    """A JPEG whose EXIF orientation says "rotate 90 degrees", and a grayscale PNG."""
    image = pil(20, 30, seed=7)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif)
    pil(10, 10, mode="L").save(tmp_path / "gray.png")
    return tmp_path


def test_load_image_files(exif_png):
    for name in ("rotated.jpg", "gray.png"):
        got, want = load_image(str(exif_png / name)), ref_load_image(str(exif_png / name))
        same(got, want)
        assert got.mode == "RGB"
    assert load_image(str(exif_png / "rotated.jpg")).size == (20, 30)  # turned upright
    got = load_image(exif_png / "gray.png", convert_method=lambda im: im.convert("L"))
    assert got.mode == "L"
    same(load_image(PIL.Image.open(exif_png / "rotated.jpg")), load_image(str(exif_png / "rotated.jpg")))
    with pytest.raises(ValueError, match="neither an existing file"):
        load_image(str(exif_png / "missing.png"))
    with pytest.raises(ValueError, match="not int"):
        load_image(3)


def test_load_image_url(exif_png):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(exif_png))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/rotated.jpg"
        same(load_image(url), load_image(str(exif_png / "rotated.jpg")))
    finally:
        server.shutdown()
        server.server_close()
