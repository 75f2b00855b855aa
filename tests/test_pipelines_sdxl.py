"""Stable Diffusion XL pipelines (base, img2img, refiner) against diffusers, on tiny folders diffusers wrote.

diffloom loads every folder with its own classes; same seeds must give the same images (float32, within 1e-4),
including the base-to-refiner hand-over through latents and the SDXL CFG cutoff callback.
"""

import diffusers
import numpy as np
import pytest
import torch

import diffloom
import tiny
from diffloom import (AutoPipelineForImage2Image, AutoPipelineForText2Image, SDXLCFGCutoffCallback,
                      StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

TOL = 1e-4
PROMPT = "a photo of the red cat"
H, W = tiny.IMAGE_HEIGHT, tiny.IMAGE_WIDTH


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same(a, b, tol=TOL):
    a, b = (x.detach().float().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32) for x in (a, b))
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol, f"max abs difference {np.abs(a - b).max()}"


def compare(ours, ref, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", **kwargs}
    if "image" not in kwargs:
        kwargs = {"height": H, "width": W, **kwargs}
    gens = (lambda: [gen(s) for s in seed]) if isinstance(seed, list) else (lambda: gen(seed))
    a, b = ours(**kwargs, generator=gens()), ref(**kwargs, generator=gens())
    assert_same(a.images, b.images)
    if kwargs["output_type"] == "np":
        assert a.images.std() > 0.01  # a real image, not a saturated one
    return a, b


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return tiny.save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")


@pytest.fixture(scope="module")
def refiner_path(tmp_path_factory):
    return tiny.save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl-refiner") / "pipe", refiner=True, seed=7)


@pytest.fixture(scope="module")
def base(base_path):
    return (quiet(StableDiffusionXLPipeline.from_pretrained(base_path)),
            quiet(diffusers.StableDiffusionXLPipeline.from_pretrained(base_path)))


@pytest.fixture(scope="module")
def refiner(refiner_path):
    return (quiet(diffloom.DiffusionPipeline.from_pretrained(refiner_path)),
            quiet(diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_path)))


def test_loads_own_classes(base, refiner):
    assert type(base[0].unet).__module__.startswith("diffloom_models")
    assert type(base[0].scheduler).__module__.startswith("diffloom_schedulers")
    ours = refiner[0]
    assert type(ours) is StableDiffusionXLImg2ImgPipeline
    assert ours.text_encoder is None and ours.config.requires_aesthetics_score


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guidance_scale=1.0),
    dict(negative_prompt="blurry", prompt_2="a dog", negative_prompt_2="dark", clip_skip=1),
    dict(prompt=["a cat", "the red dog"], num_images_per_prompt=2, negative_prompt=["blurry", "dark"]),
    dict(original_size=(64, 96), crops_coords_top_left=(4, 8), target_size=(48, 32),
         negative_original_size=(16, 16), negative_crops_coords_top_left=(2, 2), negative_target_size=(8, 8),
         guidance_rescale=0.7),
    dict(denoising_end=0.6, output_type="latent"),
], ids=["cfg", "no-cfg", "prompt2-clipskip", "batch", "micro-conditioning", "denoising-end"])
def test_txt2img(base, kwargs):
    compare(*base, **kwargs)


def test_prompt_embeds(base):
    ours, ref = base
    embeds = ours.encode_prompt(PROMPT, device=ours.device, negative_prompt="dark")
    expected = ref.encode_prompt(PROMPT, device=ref.device, negative_prompt="dark")
    for a, b in zip(embeds, expected):
        assert_same(a, b)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    compare(ours, ref, prompt=None, **dict(zip(names, embeds)))


def test_img2img(base, refiner):
    o = quiet(AutoPipelineForImage2Image.from_pipe(base[0]))
    r = quiet(diffusers.AutoPipelineForImage2Image.from_pipe(base[1]))
    assert type(o) is StableDiffusionXLImg2ImgPipeline and not o.config.requires_aesthetics_score
    compare(o, r, image=tiny.image(), strength=0.7, num_images_per_prompt=2)
    compare(*refiner, image=tiny.image(), strength=0.8, negative_prompt="blurry", aesthetic_score=7.0,
            negative_aesthetic_score=2.0)


def test_base_to_refiner_handover(base, refiner):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=H, width=W, denoising_end=0.7, output_type="latent")
    a = base[0](**kwargs, generator=gen(1)).images
    b = base[1](**kwargs, generator=gen(1)).images
    assert_same(a, b)
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, denoising_start=0.7, output_type="np")
    x = refiner[0](image=a, **kwargs, generator=gen(2)).images
    y = refiner[1](image=b, **kwargs, generator=gen(2)).images
    assert_same(x, y)


def test_cfg_cutoff_callback(base):
    ours, ref = base
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=H, width=W, output_type="np")
    a = ours(**kwargs, generator=gen(0), callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))
    b = ref(**kwargs, generator=gen(0),
            callback_on_step_end=diffusers.callbacks.SDXLCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert_same(a.images, b.images)
    plain = ours(**kwargs, generator=gen(0)).images
    assert np.abs(plain - a.images).max() > 1e-3
    # Batches of any size: a batch of two is the two prompts cut off one by one.
    kwargs["prompt"] = ["a cat", "the red dog"]
    pair = ours(**kwargs, generator=[gen(3), gen(4)], callback_on_step_end=SDXLCFGCutoffCallback(
        cutoff_step_ratio=0.5)).images
    for k, (prompt, seed) in enumerate(zip(kwargs["prompt"], (3, 4))):
        one = ours(**{**kwargs, "prompt": prompt}, generator=gen(seed),
                   callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5)).images
        assert_same(pair[k:k + 1], one)


def test_auto_pipelines(base_path, refiner_path):
    assert type(AutoPipelineForText2Image.from_pretrained(base_path)) is StableDiffusionXLPipeline
    assert type(AutoPipelineForImage2Image.from_pretrained(base_path)) is StableDiffusionXLImg2ImgPipeline
    assert type(AutoPipelineForImage2Image.from_pretrained(refiner_path)) is StableDiffusionXLImg2ImgPipeline


def test_errors(base, refiner):
    ours = base[0]
    without_second = StableDiffusionXLPipeline.from_pipe(ours, text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(ValueError, match="text_encoder_2"):
        without_second(PROMPT, num_inference_steps=2, height=H, width=W)
    with pytest.raises(ValueError, match="denoising_start=0.8 must be below denoising_end=0.5"):
        refiner[0](PROMPT, image=tiny.image(), denoising_start=0.8, denoising_end=0.5)
    embeds = ours.encode_prompt(PROMPT, device=ours.device)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=embeds[0], num_inference_steps=2, height=H, width=W)
    with pytest.raises(ValueError, match="requires_aesthetics_score"):
        StableDiffusionXLImg2ImgPipeline.from_pipe(refiner[0], requires_aesthetics_score=False)(
            PROMPT, image=tiny.image(), num_inference_steps=2, strength=1.0)


def test_fp16_vae_is_upcast_for_decoding(base):
    ours = base[0]
    vae16 = diffloom.AutoencoderKL.from_config(ours.vae.config)
    vae16.load_state_dict(ours.vae.state_dict())
    vae16.to(torch.float16)
    assert vae16.config.force_upcast
    pipe = StableDiffusionXLPipeline.from_pipe(ours, vae=vae16)
    latents = torch.randn(1, 4, H // 8, W // 8, generator=gen(0))
    image = pipe.decode_latents(latents.half())
    assert image.dtype == torch.float32 and vae16.dtype == torch.float16
    assert_same(image, ours.decode_latents(latents), tol=5e-3)


# -- inpainting ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpaint9(tmp_path_factory):
    path = tiny.save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl-inpaint") / "pipe", in_channels=9, seed=3)
    return (quiet(diffloom.DiffusionPipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(path)))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(strength=0.6, num_images_per_prompt=2, negative_prompt="blurry"),
    dict(strength=1.0, guidance_scale=1.0),
], ids=["default", "strength-batch", "strength-max-no-cfg"])
def test_inpaint_9_channels(inpaint9, kwargs):
    assert type(inpaint9[0]) is diffloom.StableDiffusionXLInpaintPipeline
    compare(*inpaint9, image=tiny.image(), mask_image=tiny.mask(), height=H, width=W, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(strength=0.7), dict(padding_mask_crop=2, output_type="pil")],
                         ids=["blend", "padding-crop"])
def test_inpaint_plain_unet(base, kwargs):
    o = quiet(diffloom.AutoPipelineForInpainting.from_pipe(base[0]))
    r = quiet(diffusers.AutoPipelineForInpainting.from_pipe(base[1]))
    assert type(o) is diffloom.StableDiffusionXLInpaintPipeline
    a, b = (p(PROMPT, image=tiny.image(), mask_image=tiny.mask(), height=H, width=W, num_inference_steps=3,
              generator=gen(0), **{"output_type": "np", **kwargs}).images for p in (o, r))
    assert_same(a, b, tol=0 if kwargs.get("output_type") == "pil" else TOL)


def test_inpaint_handover_from_base(base, inpaint9):
    kwargs = dict(prompt=PROMPT, num_inference_steps=4, height=H, width=W, denoising_end=0.5, output_type="latent")
    latents = base[0](**kwargs, generator=gen(1)).images
    # A plain-UNet inpainting pipeline resumes the base's latents; the inpainting UNet resumes from the image.
    o = quiet(diffloom.AutoPipelineForInpainting.from_pipe(base[0]))
    r = quiet(diffusers.AutoPipelineForInpainting.from_pipe(base[1]))
    kwargs = dict(prompt=PROMPT, mask_image=tiny.mask(), height=H, width=W, num_inference_steps=4,
                  denoising_start=0.5, output_type="np")
    assert_same(o(image=latents, **kwargs, generator=gen(2)).images, r(image=latents, **kwargs,
                                                                        generator=gen(2)).images)
    assert_same(inpaint9[0](image=tiny.image(), **kwargs, generator=gen(2)).images,
                inpaint9[1](image=tiny.image(), **kwargs, generator=gen(2)).images)


def test_refiner_save_round_trip(refiner, tmp_path):
    """A folder diffloom writes (no first text encoder) loads in diffusers and gives the same images."""
    ours, _ = refiner
    ours.save_pretrained(tmp_path / "saved")
    again = quiet(diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "saved"))
    assert again.text_encoder is None and again.config.requires_aesthetics_score
    compare(ours, again, image=tiny.image(), strength=0.8)
