"""The x4 and x2-latent upscalers and depth-to-image against diffusers, on tiny folders diffusers wrote."""

import diffusers
import numpy as np
import pytest
import torch

import diffloom
import tiny
from diffloom import (StableDiffusionDepth2ImgPipeline, StableDiffusionLatentUpscalePipeline,
                      StableDiffusionUpscalePipeline)

TOL = 1e-4
PROMPT = "a photo of the red cat"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol, f"max abs difference {np.abs(a - b).max()}"


def compare(ours, ref, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", **kwargs}
    a, b = ours(**kwargs, generator=gen(0)).images, ref(**kwargs, generator=gen(0)).images
    assert_same(a, b)
    assert a.std() > 0.01
    return a


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_both(path, ref_class):
    return quiet(diffloom.DiffusionPipeline.from_pretrained(path)), quiet(ref_class.from_pretrained(path))


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    path = tiny.save_x4_upscaler_folder(tmp_path_factory.mktemp("tiny-x4") / "pipe")
    return load_both(path, diffusers.StableDiffusionUpscalePipeline)


@pytest.fixture(scope="module")
def latent_x2(tmp_path_factory):
    path = tiny.save_latent_upscaler_folder(tmp_path_factory.mktemp("tiny-x2") / "pipe")
    return load_both(path, diffusers.StableDiffusionLatentUpscalePipeline)


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    path = tiny.save_depth2img_folder(tmp_path_factory.mktemp("tiny-depth") / "pipe")
    return load_both(path, diffusers.StableDiffusionDepth2ImgPipeline)


LOW = dict(height=8, width=12)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(noise_level=100, guidance_scale=1.0),
    dict(prompt=["a cat", "the red dog"], image=[tiny.image(**LOW, seed=3), tiny.image(**LOW, seed=4)]),
    dict(num_images_per_prompt=2, negative_prompt="blurry", eta=0.5),
], ids=["cfg", "noise-level-no-cfg", "batch", "images-per-prompt"])
def test_x4_upscaler(x4, kwargs):
    assert type(x4[0]) is StableDiffusionUpscalePipeline
    assert type(x4[0].low_res_scheduler).__module__.startswith("diffloom_schedulers")
    image = compare(*x4, **{"image": tiny.image(**LOW, seed=3), **kwargs})
    assert image.shape[1:3] == (32, 48)  # 4x the low-resolution image


def test_x4_upscaler_errors(x4):
    with pytest.raises(ValueError, match="max_noise_level=350"):
        x4[0](PROMPT, image=tiny.image(**LOW), noise_level=400, num_inference_steps=2)
    with pytest.raises(ValueError, match="image has 1 images for 2 prompts"):
        x4[0](["a", "b"], image=[tiny.image(**LOW)], num_inference_steps=2)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guidance_scale=1.0),
    dict(negative_prompt="blurry", guidance_scale=0.0),
    dict(image=tiny.image()),
], ids=["cfg", "no-cfg", "scale-zero", "pixels"])
def test_latent_upscaler(latent_x2, kwargs):
    assert type(latent_x2[0]) is StableDiffusionLatentUpscalePipeline
    latents = torch.randn(1, 4, 4, 6, generator=gen(5))
    image = compare(*latent_x2, **{"image": latents, **kwargs})
    assert image.shape[1:3] == (64, 96)  # 2x the 32x48 image those latents stand for


def test_sd_to_latent_upscaler(tiny_sd_path, latent_x2):
    """SD text-to-image with output_type="latent", upscaled 2x in latent space."""
    ours_sd = quiet(diffloom.StableDiffusionPipeline.from_pretrained(tiny_sd_path))
    ref_sd = quiet(diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path))
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=32, width=48, output_type="latent")
    a, b = ours_sd(**kwargs, generator=gen(1)).images, ref_sd(**kwargs, generator=gen(1)).images
    assert_same(a, b)
    compare(*latent_x2, image=a)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(depth_map=torch.rand(1, 16, 24, generator=gen(3)), strength=0.6),
    dict(prompt=["a cat", "the red dog"], num_images_per_prompt=2, guidance_scale=1.0),
], ids=["estimated", "given-depth-map", "batch-no-cfg"])
def test_depth2img(depth, kwargs):
    assert type(depth[0]) is StableDiffusionDepth2ImgPipeline
    assert type(depth[0].depth_estimator).__name__ == "DPTForDepthEstimation"
    compare(*depth, image=tiny.image(), **kwargs)


def test_depth2img_without_estimator(depth):
    pipe = StableDiffusionDepth2ImgPipeline.from_pipe(depth[0], depth_estimator=None, feature_extractor=None)
    with pytest.raises(ValueError, match="pass depth_map="):
        pipe(PROMPT, image=tiny.image(), num_inference_steps=2)
    a = pipe(PROMPT, image=tiny.image(), depth_map=torch.rand(1, 16, 24, generator=gen(3)), num_inference_steps=2,
             output_type="np", generator=gen(0)).images
    b = depth[0](PROMPT, image=tiny.image(), depth_map=torch.rand(1, 16, 24, generator=gen(3)),
                 num_inference_steps=2, output_type="np", generator=gen(0)).images
    assert_same(a, b, tol=0)
