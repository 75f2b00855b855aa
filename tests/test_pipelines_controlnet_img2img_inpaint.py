"""ControlNet image-to-image and inpainting pipelines against diffusers, on tiny folders diffusers wrote (one
ControlNet and two; plain 4-channel UNets and a 9-channel inpainting one)."""

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import diffloom
import tiny
from diffloom import (AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image,
                      StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline,
                      StableDiffusionControlNetPipeline)

TOL = 1e-4
PROMPT = "a photo of the red cat"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same(a, b, tol=TOL, key=None):
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    assert a.shape == b.shape
    diff = float(np.abs(a - b).max())
    if key:  # the parity figure, shown with pytest -s
        print(f"{key}: max abs difference {diff:.2e}")
    assert diff <= tol, f"max abs difference {diff}"


def run(pipe, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(**kwargs, generator=gen(seed)).images


def compare(ours, ref, key=None, **kwargs):
    a, b = run(ours, **kwargs), run(ref, **kwargs)
    # PIL images are 8-bit: a float difference of 1e-6 can still round to the next level.
    assert_same(a, b, tol=1.0 if kwargs.get("output_type") == "pil" else TOL, key=key)
    return a


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- fixtures: diffloom and diffusers pipelines over the same tiny folders -------------------------------------


def sensitive_controlnet(unet, seed):
    """A tiny ControlNet that reacts to its condition image. In :func:`tiny.diffusers_controlnet`'s the image
    fades through the condition embedding's seven small convs (its last one starts at zero in diffusers), so
    another condition image changes the output by ~1e-5 and a mistake in preparing it would go unseen; here the
    embedding's convs get a signal-keeping scale (gain 2 for SiLU)."""
    net = tiny.diffusers_controlnet(unet, seed)
    embedding = net.controlnet_cond_embedding
    generator = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks, embedding.conv_out):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 2 / fan_in ** 0.5)
    return net


def save_folder(path, num_controlnets=1, in_channels=4, pipeline="StableDiffusionControlNetPipeline"):
    """A tiny SD ControlNet folder written by diffusers' ``pipeline`` class."""
    components = tiny.diffusers_sd_components(path.parent / (path.name + "-build"), in_channels=in_channels)
    unet = components["unet"]
    if in_channels != 4:
        # The ControlNet reads the 4 latent channels only, so it is copied from a 4-channel UNet.
        torch.manual_seed(7)
        unet = diffusers.UNet2DConditionModel(**tiny.unet_config(4))
    nets = [sensitive_controlnet(unet, 20 * k) for k in range(num_controlnets)]
    components["controlnet"] = nets[0] if num_controlnets == 1 else nets
    getattr(diffusers, pipeline)(**components).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text2image(tmp_path_factory):
    path = save_folder(tmp_path_factory.mktemp("tiny-cn") / "pipe")
    return (quiet(diffloom.DiffusionPipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionControlNetPipeline.from_pretrained(path)))


@pytest.fixture(scope="module")
def multi_text2image(tmp_path_factory):
    path = save_folder(tmp_path_factory.mktemp("tiny-cn2") / "pipe", num_controlnets=2)
    return (quiet(StableDiffusionControlNetPipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionControlNetPipeline.from_pretrained(path)))


def through_auto(pair, ours_auto, ref_auto):
    """Both libraries' AutoPipeline ``from_pipe`` of a ControlNet text-to-image pipeline."""
    ours, ref = ours_auto.from_pipe(pair[0]), ref_auto.from_pipe(pair[1])
    assert type(ours).__name__ == type(ref).__name__
    return quiet(ours), quiet(ref)


@pytest.fixture(scope="module")
def img2img(text2image):
    return through_auto(text2image, AutoPipelineForImage2Image, diffusers.AutoPipelineForImage2Image)


@pytest.fixture(scope="module")
def inpaint(text2image):
    return through_auto(text2image, AutoPipelineForInpainting, diffusers.AutoPipelineForInpainting)


@pytest.fixture(scope="module")
def multi_img2img(multi_text2image):
    return through_auto(multi_text2image, AutoPipelineForImage2Image, diffusers.AutoPipelineForImage2Image)


@pytest.fixture(scope="module")
def multi_inpaint(multi_text2image):
    return through_auto(multi_text2image, AutoPipelineForInpainting, diffusers.AutoPipelineForInpainting)


@pytest.fixture(scope="module")
def inpaint9(tmp_path_factory):
    """A ControlNet inpainting folder with a 9-channel UNet, written by diffusers' own pipeline class."""
    path = save_folder(tmp_path_factory.mktemp("tiny-cn-inpaint9") / "pipe", in_channels=9,
                       pipeline="StableDiffusionControlNetInpaintPipeline")
    return (quiet(diffloom.DiffusionPipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(path)))


def with_scheduler(pair, name):
    ours, ref = pair
    return (quiet(type(ours).from_pipe(ours, scheduler=getattr(diffloom, name).from_config(ours.scheduler.config))),
            quiet(type(ref).from_pipe(ref, scheduler=getattr(diffusers, name).from_config(ref.scheduler.config))))


def zero_control_at_step_1(pipe, i, t, kwargs):
    """A callback that switches the condition image to black from step 1 on."""
    if i == 1:
        kwargs["control_image"] = torch.zeros_like(kwargs["control_image"])
    return kwargs


# -- image-to-image ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guess_mode=True, strength=0.6),
    dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.3, control_guidance_end=0.7, strength=1.0),
    dict(prompt=["a cat", "the red dog"], num_images_per_prompt=2, negative_prompt=["blurry", "dark"]),
    dict(guidance_scale=1.0, height=48, width=32),
    dict(callback_on_step_end=zero_control_at_step_1, callback_on_step_end_tensor_inputs=["control_image"]),
], ids=["defaults", "guess-mode", "scale-window", "batch", "no-cfg-resized", "callback-control-image"])
def test_img2img(img2img, kwargs, request):
    ours = img2img[0]
    assert type(ours) is StableDiffusionControlNetImg2ImgPipeline
    compare(*img2img, key=request.node.name, image=tiny.image(seed=3), control_image=tiny.image(seed=1), **kwargs)


def test_img2img_euler_and_given_latents(img2img):
    pair = with_scheduler(img2img, "EulerDiscreteScheduler")
    compare(*pair, key="img2img-euler", image=tiny.image(seed=3), control_image=tiny.image(seed=1), strength=0.7)
    latents = torch.randn(1, 4, 4, 6, generator=gen(5))
    compare(*img2img, key="img2img-latents", image=tiny.image(seed=3), control_image=tiny.image(seed=1),
            latents=latents)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(controlnet_conditioning_scale=[0.5, 0.9], control_guidance_start=[0.0, 0.3], control_guidance_end=0.7,
         guess_mode=True, num_images_per_prompt=2),
], ids=["defaults", "per-net-guess-batch"])
def test_multi_img2img(multi_img2img, kwargs, request):
    ours = multi_img2img[0]
    assert type(ours.controlnet).__name__ == "MultiControlNetModel" and len(ours.controlnet.nets) == 2
    compare(*multi_img2img, key=request.node.name, image=tiny.image(seed=3),
            control_image=[tiny.image(seed=1), tiny.image(seed=2)], **kwargs)


def test_control_image_steers_img2img(img2img):
    ours = img2img[0]
    kwargs = dict(image=tiny.image(seed=3), control_image=tiny.image(seed=1))
    base = run(ours, **kwargs)
    assert np.abs(base - run(ours, **kwargs, controlnet_conditioning_scale=0.0)).max() > 1e-2
    flipped = tiny.image(seed=1).transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.abs(base - run(ours, **{**kwargs, "control_image": flipped})).max() > 1e-2
    # A callback's replacement of the condition image takes effect.
    changed = run(ours, **kwargs, callback_on_step_end=zero_control_at_step_1,
                  callback_on_step_end_tensor_inputs=["control_image"])
    assert np.abs(base - changed).max() > 1e-2


# -- inpainting --------------------------------------------------------------------------------------------------


INPAINT = dict(image=tiny.image(seed=3), mask_image=tiny.mask(), control_image=tiny.image(seed=1))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(strength=0.7, guess_mode=True),
    dict(controlnet_conditioning_scale=0.9, control_guidance_start=0.25, control_guidance_end=0.75,
         prompt=["a cat", "the red dog"], num_images_per_prompt=2),
    dict(padding_mask_crop=2, output_type="pil"),
    dict(callback_on_step_end=zero_control_at_step_1, callback_on_step_end_tensor_inputs=["control_image"],
         guidance_scale=1.0),
], ids=["defaults", "strength-guess-mode", "window-batch", "padding-mask-crop", "callback-no-cfg"])
def test_inpaint_plain_unet(inpaint, kwargs, request):
    ours = inpaint[0]
    assert type(ours) is StableDiffusionControlNetInpaintPipeline and ours.unet.config.in_channels == 4
    compare(*inpaint, key=request.node.name, **{**INPAINT, **kwargs})


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guess_mode=True, strength=0.6, control_guidance_end=0.5),
    dict(num_images_per_prompt=2, negative_prompt="blurry", controlnet_conditioning_scale=1.0),
], ids=["defaults", "guess-mode-window", "batch"])
def test_inpaint_9_channel_unet(inpaint9, kwargs, request):
    ours = inpaint9[0]
    assert type(ours) is StableDiffusionControlNetInpaintPipeline and ours.unet.config.in_channels == 9
    compare(*inpaint9, key=request.node.name, **{**INPAINT, **kwargs})


def test_inpaint_euler(inpaint9, inpaint):
    for name, pair in (("9ch", inpaint9), ("4ch", inpaint)):
        compare(*with_scheduler(pair, "EulerDiscreteScheduler"), key=f"inpaint-{name}-euler", **INPAINT,
                strength=0.8)


def test_multi_inpaint(multi_inpaint):
    compare(*multi_inpaint, key="multi-inpaint", **{**INPAINT, "control_image": [tiny.image(seed=1),
                                                                               tiny.image(seed=2)]},
            controlnet_conditioning_scale=[0.6, 0.4], guess_mode=True)


# -- AutoPipeline routes and errors --------------------------------------------------------------------------------


def test_auto_pipeline_routes(text2image, img2img, tiny_sd_path, tiny_sd_inpaint_path):
    controlnet = text2image[0].controlnet
    # To and from the plain pipelines, as diffusers does.
    plain = AutoPipelineForImage2Image.from_pipe(img2img[0], controlnet=None)
    assert type(plain) is diffloom.StableDiffusionImg2ImgPipeline
    back = AutoPipelineForImage2Image.from_pipe(plain, controlnet=controlnet)
    assert type(back) is StableDiffusionControlNetImg2ImgPipeline and back.unet is img2img[0].unet
    assert type(AutoPipelineForText2Image.from_pipe(back)) is StableDiffusionControlNetPipeline
    assert type(AutoPipelineForInpainting.from_pipe(back)) is StableDiffusionControlNetInpaintPipeline
    ref_plain = diffusers.AutoPipelineForImage2Image.from_pipe(img2img[1], controlnet=None)
    assert type(ref_plain).__name__ == type(plain).__name__

    ours = AutoPipelineForImage2Image.from_pretrained(tiny_sd_path, controlnet=controlnet)
    assert type(ours) is StableDiffusionControlNetImg2ImgPipeline
    # An inpainting folder with a ControlNet: the 9-channel UNet steered by it.
    ours = quiet(AutoPipelineForInpainting.from_pretrained(tiny_sd_inpaint_path, controlnet=controlnet))
    ref = quiet(diffusers.AutoPipelineForInpainting.from_pretrained(tiny_sd_inpaint_path,
                                                                   controlnet=text2image[1].controlnet))
    assert type(ours) is StableDiffusionControlNetInpaintPipeline and ours.unet.config.in_channels == 9
    assert type(ref).__name__ == type(ours).__name__
    compare(ours, ref, key="auto-inpaint-9ch", **INPAINT, num_inference_steps=2)


def test_round_trip_through_diffusers(inpaint9, tmp_path):
    ours, _ = inpaint9
    ours.save_pretrained(tmp_path / "saved")
    again = quiet(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert type(again).__name__ == "StableDiffusionControlNetInpaintPipeline"
    compare(ours, again, **INPAINT, num_inference_steps=2)


def test_errors(img2img, inpaint, multi_img2img):
    with pytest.raises(ValueError, match="needs control_image="):
        run(img2img[0], image=tiny.image())
    with pytest.raises(ValueError, match="needs control_image="):
        run(inpaint[0], image=tiny.image(), mask_image=tiny.mask())
    with pytest.raises(ValueError, match="needs a mask_image="):
        run(inpaint[0], image=tiny.image(), control_image=tiny.image())
    with pytest.raises(ValueError, match=r"control_image is \(48, 48\) \(height, width\) but image is \(32, 48\)"):
        run(img2img[0], image=tiny.image(), control_image=tiny.image(height=48, width=48))
    with pytest.raises(ValueError, match="control_image is"):
        run(inpaint[0], image=tiny.image(), mask_image=tiny.mask(), control_image=tiny.image(height=48, width=48))
    with pytest.raises(ValueError, match="holds lists"):
        run(multi_img2img[0], image=tiny.image(), control_image=[[tiny.image(), tiny.image()]])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs names"):
        run(img2img[0], image=tiny.image(), control_image=tiny.image(), callback_on_step_end=lambda p, i, t, k: k,
            callback_on_step_end_tensor_inputs=["image"])
