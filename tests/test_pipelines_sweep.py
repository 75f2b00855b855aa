"""Call-argument parity with diffusers: regressions for the discrepancies a sweep of the pipelines' arguments found.

Each test pins one class of discrepancy, on tiny folders diffusers wrote: same arguments and seeds give the same
images (float32, within 1e-4), and where diffusers rejects an argument diffloom rejects it too, naming it.
"""

import inspect

import diffusers
import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

import diffloom
import tiny

TOL = 1e-4
PROMPT = "a photo of the red cat"
H, W = tiny.IMAGE_HEIGHT, tiny.IMAGE_WIDTH

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_array(images):
    if isinstance(images, torch.Tensor):
        return images.float().numpy()
    return np.asarray(images, dtype=np.float32)


def compare(ours, ref, seed=0, **kwargs):
    """Run both pipelines with the same arguments; a list ``seed`` gives each a list of generators."""
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", **kwargs}
    gens = (lambda: [gen(s) for s in seed]) if isinstance(seed, list) else (lambda: gen(seed))
    a, b = as_array(ours(**kwargs, generator=gens()).images), as_array(ref(**kwargs, generator=gens()).images)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= TOL, f"max abs difference {np.abs(a - b).max()}"
    return a


def both_reject(ours, ref, match, error=ValueError, **kwargs):
    """diffusers rejects these arguments, and diffloom does too with a message matching ``match``."""
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "output_type": "np", **kwargs}
    with pytest.raises(error):
        ref(**kwargs)
    with pytest.raises(error, match=match):
        ours(**kwargs)


def strongly_conditioned_controlnets(unet, count, seed):
    """Tiny diffusers ControlNets whose condition-embedding weights are large enough that the condition image
    visibly changes the result (the default tiny ones are dominated by their biases)."""
    nets = [tiny.diffusers_controlnet(unet, seed + 20 * k) for k in range(count)]
    generator = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for net in nets:
            for p in net.controlnet_cond_embedding.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return nets


# -- Stable Diffusion --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    return (quiet(diffloom.StableDiffusionPipeline.from_pretrained(tiny_sd_path)),
            quiet(diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)))


@pytest.mark.parametrize("size", [dict(height=48), dict(width=16), dict(height=0, width=W)],
                         ids=["height-only", "width-only", "zero-height"])
def test_txt2img_one_sided_size_takes_the_default(sd, size):
    """Text-to-image falls back to the UNet's size for both sides unless both are given."""
    image = compare(*sd, num_inference_steps=2, **size)
    assert image.shape[1:3] == (64, 64)


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                  "StableDiffusionInpaintPipeline"])
def test_positional_argument_order(name):
    """Arguments given by position land where diffusers puts them (the IP-Adapter pair before output_type)."""
    ref = [p for p in inspect.signature(getattr(diffusers, name).__call__).parameters if p != "kwargs"]
    # diffusers takes the deprecated callback/callback_steps through **kwargs; diffloom names them last.
    ours = [p for p in inspect.signature(getattr(diffloom, name).__call__).parameters
            if p not in ("hooks", "callback", "callback_steps")]
    assert ours == ref


# -- ControlNet --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """(diffloom, diffusers) pipelines with two ControlNets, and with the first of them alone."""
    path = tmp_path_factory.mktemp("sweep-cn") / "pipe"
    components = tiny.diffusers_sd_components(path.parent / "build")
    components["controlnet"] = strongly_conditioned_controlnets(components["unet"], 2, seed=0)
    diffusers.StableDiffusionControlNetPipeline(**components).save_pretrained(path)
    multi = (quiet(diffloom.StableDiffusionControlNetPipeline.from_pretrained(path)),
             quiet(diffusers.StableDiffusionControlNetPipeline.from_pretrained(path)))
    single = (quiet(diffloom.StableDiffusionControlNetPipeline.from_pipe(multi[0],
                                                                          controlnet=multi[0].controlnet.nets[0])),
              quiet(diffusers.StableDiffusionControlNetPipeline.from_pipe(multi[1],
                                                                           controlnet=multi[1].controlnet.nets[0])))
    return multi, single


EDGES, DARK = tiny.image(seed=1), PIL.ImageOps.invert(tiny.image(seed=5))


def test_controlnet_image_matters(controlnets):
    """The fixture's condition images change the result, so the layout tests below can tell images apart."""
    ours = controlnets[0][0]
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, output_type="np", generator=gen(0))
    a = ours(image=[EDGES, DARK], **kwargs).images
    kwargs["generator"] = gen(0)
    b = ours(image=[DARK, EDGES], **kwargs).images
    assert np.abs(a - b).max() > 0.05


@pytest.mark.parametrize("prompt,image", [
    (["a cat", "a dog"], [[EDGES, DARK], [EDGES, EDGES]]),
    ("a cat", [[EDGES, DARK]]),
    (["a", "b", "c"], [[DARK, EDGES], [EDGES, EDGES], [DARK, DARK]]),
], ids=["two-prompts", "one-prompt", "three-prompts"])
def test_multi_controlnet_nested_images_are_rows_per_prompt(controlnets, prompt, image):
    """A list of lists holds one row per prompt with one image per ControlNet in each row."""
    compare(*controlnets[0], prompt=prompt, image=image, num_inference_steps=2)


def test_multi_controlnet_nested_images_errors(controlnets):
    multi = controlnets[0]
    for image in ([[EDGES, DARK], [EDGES]], [[EDGES, DARK, EDGES], [EDGES, DARK, DARK]]):
        both_reject(*multi, "every row must be a list of 2 images", prompt=["a", "b"], image=image)


def test_controlnet_image_batch_counts_the_first_axis(controlnets):
    """As in diffusers, a tensor or array counts its first axis as the batch: a 3-D one is refused for one prompt,
    and a 4-D batch of one is accepted."""
    multi, single = controlnets
    array = np.asarray(EDGES, dtype=np.float32) / 255
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    both_reject(*single, r"image has 3 condition images for 1 prompts \(a 3-D tensor", image=tensor)
    both_reject(*single, "image has 32 condition images", image=array)
    both_reject(*single, "image has 2 condition images for 1 prompts", image=np.stack([array, array]))
    both_reject(*multi, "ControlNet 0.s image has 3 condition images", image=[tensor, tensor])
    compare(*single, image=tensor[None], num_inference_steps=2)
    compare(*single, image=array[None] * 2 - 1, num_inference_steps=2)


def test_single_controlnet_refuses_a_list_of_scales(controlnets):
    multi, single = controlnets
    both_reject(*single, "one ControlNet: pass a single float", error=TypeError, image=EDGES,
                controlnet_conditioning_scale=[0.5])
    both_reject(*multi, "one float for the whole batch", image=[EDGES, DARK],
                controlnet_conditioning_scale=[[0.5, 1.0], [0.5, 1.0]])
    compare(*multi, image=[EDGES, DARK], controlnet_conditioning_scale=[0.3, 0.9], num_inference_steps=2)


# -- the x4 upscaler ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    path = tiny.save_x4_upscaler_folder(tmp_path_factory.mktemp("sweep-x4") / "pipe")
    return (quiet(diffloom.StableDiffusionUpscalePipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionUpscalePipeline.from_pretrained(path)))


LOW = [tiny.image(8, 12, seed=3), PIL.ImageOps.invert(tiny.image(8, 12, seed=4))]


@pytest.mark.parametrize("guidance_scale", [9.0, 1.0], ids=["cfg", "no-cfg"])
def test_x4_several_images_and_images_per_prompt(x4, guidance_scale):
    """num_images_per_prompt repeats the whole image batch; a list of generators (one per output) works."""
    compare(*x4, seed=[1, 2, 3, 4], prompt=["a cat", "a dog"], image=LOW, num_images_per_prompt=2,
            guidance_scale=guidance_scale, num_inference_steps=2)
    compare(*x4, seed=[5, 6], image=LOW[0], num_images_per_prompt=2, num_inference_steps=2)


def test_x4_image_batch_counts_the_first_axis(x4):
    array = np.asarray(LOW[0], dtype=np.float32) / 255
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    both_reject(*x4, r"image has 3 images for 1 prompts \(a 3-D tensor", image=tensor)
    both_reject(*x4, "image has 2 images for 1 prompts", image=np.stack([array, array]))
    compare(*x4, image=tensor[None] * 2 - 1, num_inference_steps=2)
    compare(*x4, image=array[None], num_inference_steps=2)
    with pytest.raises(ValueError, match="image has 1 images for 2 prompts"):  # diffusers fails in torch.cat
        x4[0](["a", "b"], image=LOW[0], num_inference_steps=2)


# -- Stable Diffusion XL -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    path = tiny.save_sdxl_folder(tmp_path_factory.mktemp("sweep-sdxl") / "pipe")
    return (quiet(diffloom.StableDiffusionXLPipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionXLPipeline.from_pretrained(path)))


def test_sdxl_img2img_denoising_start_past_the_schedule(xl):
    """A denoising_start after the last timestep leaves no step: the image comes back through the VAE alone.
    Inpainting refuses it, naming denoising_start."""
    i2i = (quiet(diffloom.StableDiffusionXLImg2ImgPipeline.from_pipe(xl[0])),
           quiet(diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(xl[1])))
    compare(*i2i, image=tiny.image(), num_inference_steps=4, denoising_start=0.9999)
    inpaint = (quiet(diffloom.StableDiffusionXLInpaintPipeline.from_pipe(xl[0])),
               quiet(diffusers.StableDiffusionXLInpaintPipeline.from_pipe(xl[1])))
    both_reject(*inpaint, "denoising_start=0.9999 leaves 0 denoising steps", image=tiny.image(),
                mask_image=tiny.mask(), height=H, width=W, num_inference_steps=4, denoising_start=0.9999)


def test_sdxl_multi_controlnet_takes_one_image_per_net(xl, tmp_path):
    """Unlike the SD pipeline, the SDXL one takes no list of lists with several ControlNets."""
    nets = strongly_conditioned_controlnets(xl[1].unet, 2, seed=3)
    for k, net in enumerate(nets):
        net.save_pretrained(tmp_path / f"cn{k}")
    ours = quiet(diffloom.StableDiffusionXLControlNetPipeline.from_pipe(
        xl[0], controlnet=[diffloom.ControlNetModel.from_pretrained(tmp_path / f"cn{k}") for k in range(2)]))
    ref = quiet(diffusers.StableDiffusionXLControlNetPipeline.from_pipe(xl[1], controlnet=nets))
    compare(ours, ref, prompt=["a", "b"], image=[EDGES, DARK], controlnet_conditioning_scale=[0.6, 1.0],
            num_inference_steps=2)
    both_reject(ours, ref, "image holds lists", prompt=["a", "b"], image=[[EDGES, DARK], [DARK, EDGES]])


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=["a", "b"], prompt_2="c"), "prompt_2 has 1 entries for 2 prompts"),
    (dict(prompt=["a", "b"], prompt_2=["c", "d", "e"]), "prompt_2 has 3 entries for 2 prompts"),
    (dict(prompt=["a", "b"], negative_prompt=["c", "d"], negative_prompt_2=["e"]),
     "negative_prompt_2 has 1 entries for 2 prompts"),
], ids=["prompt2-str", "prompt2-long", "negative-prompt2-short"])
def test_sdxl_second_prompts_pair_with_the_first(xl, kwargs, match):
    """diffusers fails deep in torch.cat; diffloom names the argument."""
    ours, ref = xl
    kwargs = dict(kwargs, num_inference_steps=2, height=H, width=W)
    with pytest.raises(RuntimeError):
        ref(**kwargs)
    with pytest.raises(ValueError, match=match):
        ours(**kwargs)
    # One entry per prompt works, and a single negative_prompt_2 string serves every prompt.
    compare(ours, ref, prompt=["a", "b"], prompt_2=["c", "d"], negative_prompt=["e", "f"], negative_prompt_2="g",
            num_inference_steps=2, height=H, width=W)


NEGATIVE_MICRO = dict(negative_original_size=(16, 24), negative_crops_coords_top_left=(2, 4),
                      negative_target_size=(24, 16))


def test_sdxl_negative_micro_conditioning_with_several_images(xl, tmp_path):
    """diffusers' SDXL text-to-image and ControlNet pipelines alternate negative and positive time ids per
    image; diffloom follows, so several images with a negative micro-conditioning come out the same."""
    compare(*xl, prompt=["a", "b"], num_images_per_prompt=2, num_inference_steps=2, height=H, width=W,
            **NEGATIVE_MICRO)
    net = strongly_conditioned_controlnets(xl[1].unet, 1, seed=5)[0]
    net.save_pretrained(tmp_path / "cn")
    ours = quiet(diffloom.StableDiffusionXLControlNetPipeline.from_pipe(
        xl[0], controlnet=diffloom.ControlNetModel.from_pretrained(tmp_path / "cn")))
    ref = quiet(diffusers.StableDiffusionXLControlNetPipeline.from_pipe(xl[1], controlnet=net))
    compare(ours, ref, prompt=["a", "b"], image=EDGES, num_inference_steps=2, **NEGATIVE_MICRO)
    # The refiner-style pipelines stack time ids like the embeddings, as diffusers' do.
    i2i = (quiet(diffloom.StableDiffusionXLImg2ImgPipeline.from_pipe(xl[0])),
           quiet(diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(xl[1])))
    compare(*i2i, prompt=["a", "b"], image=tiny.image(), num_inference_steps=4, **NEGATIVE_MICRO)
