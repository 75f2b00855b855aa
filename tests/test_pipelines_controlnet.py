"""ControlNet pipelines against diffusers, on tiny folders diffusers wrote (one ControlNet, and two)."""

import diffusers
import numpy as np
import pytest
import torch

import diffloom
import tiny
from diffloom import AutoPipelineForText2Image, StableDiffusionControlNetPipeline, StableDiffusionPipeline

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


def run(pipe, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", **kwargs}
    return pipe(**kwargs, generator=gen(seed)).images


def compare(ours, ref, **kwargs):
    a, b = run(ours, **kwargs), run(ref, **kwargs)
    assert_same(a, b)
    return a


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def single_path(tmp_path_factory):
    return tiny.save_sd_controlnet_folder(tmp_path_factory.mktemp("tiny-cn") / "pipe")


@pytest.fixture(scope="module")
def multi_path(tmp_path_factory):
    return tiny.save_sd_controlnet_folder(tmp_path_factory.mktemp("tiny-cn2") / "pipe", num_controlnets=2)


@pytest.fixture(scope="module")
def single(single_path):
    return (quiet(diffloom.DiffusionPipeline.from_pretrained(single_path)),
            quiet(diffusers.StableDiffusionControlNetPipeline.from_pretrained(single_path)))


@pytest.fixture(scope="module")
def multi(multi_path):
    return (quiet(StableDiffusionControlNetPipeline.from_pretrained(multi_path)),
            quiet(diffusers.StableDiffusionControlNetPipeline.from_pretrained(multi_path)))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guess_mode=True),
    dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.3, control_guidance_end=0.7),
    dict(prompt=["a cat", "the red dog"], num_images_per_prompt=2, negative_prompt=["blurry", "dark"]),
    dict(guidance_scale=1.0, height=48, width=32),
], ids=["cfg", "guess-mode", "scale-window", "batch", "no-cfg-resized"])
def test_single_controlnet(single, kwargs):
    ours = single[0]
    assert type(ours) is StableDiffusionControlNetPipeline
    assert type(ours.controlnet).__module__.startswith("diffloom_models")
    compare(*single, image=tiny.image(seed=1), **kwargs)


def test_control_changes_the_image(single):
    ours = single[0]
    a = run(ours, image=tiny.image(seed=1))
    b = run(ours, image=tiny.image(seed=1), controlnet_conditioning_scale=0.0)
    assert np.abs(a - b).max() > 1e-3
    # Outside the guidance window the ControlNet is off.
    assert_same(run(ours, image=tiny.image(seed=1), control_guidance_start=0.9, control_guidance_end=1.0,
                    num_inference_steps=2), run(ours, image=tiny.image(seed=1), controlnet_conditioning_scale=0.0,
                                                num_inference_steps=2))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(controlnet_conditioning_scale=[0.5, 0.8], control_guidance_start=[0.0, 0.3], control_guidance_end=0.7),
    dict(guess_mode=True, num_images_per_prompt=2),
], ids=["cfg", "per-net", "guess-mode-batch"])
def test_multi_controlnet(multi, kwargs):
    ours = multi[0]
    assert type(ours.controlnet).__name__ == "MultiControlNetModel" and len(ours.controlnet.nets) == 2
    compare(*multi, image=[tiny.image(seed=1), tiny.image(seed=2)], **kwargs)


def test_multi_controlnet_round_trip(multi, tmp_path):
    ours, ref = multi
    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "controlnet_1").is_dir()
    again = quiet(diffusers.StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved"))
    compare(ours, again, image=[tiny.image(seed=1), tiny.image(seed=2)], num_inference_steps=2)


def test_auto_pipeline_picks_controlnet(tiny_sd_path, single):
    controlnet = single[0].controlnet
    pipe = AutoPipelineForText2Image.from_pretrained(tiny_sd_path, controlnet=controlnet)
    assert type(pipe) is StableDiffusionControlNetPipeline and pipe.controlnet is controlnet
    ref = diffusers.AutoPipelineForText2Image.from_pretrained(tiny_sd_path, controlnet=single[1].controlnet)
    assert type(ref).__name__ == "StableDiffusionControlNetPipeline"
    compare(quiet(pipe), quiet(ref), image=tiny.image(seed=1), num_inference_steps=2)
    back = AutoPipelineForText2Image.from_pipe(pipe, controlnet=None)
    assert type(back) is StableDiffusionPipeline


def test_errors(single, multi):
    with pytest.raises(ValueError, match="one condition image per ControlNet"):
        run(multi[0], image=tiny.image())
    with pytest.raises(ValueError, match="one condition image per ControlNet"):
        run(multi[0], image=[tiny.image()] * 3)
    with pytest.raises(ValueError, match="different sizes"):
        run(multi[0], image=[tiny.image(), tiny.image(height=48, width=48)])
    with pytest.raises(ValueError, match="image has 3 condition images for 2 prompts"):
        run(single[0], prompt=["a", "b"], image=[tiny.image()] * 3)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 entries"):
        run(multi[0], image=[tiny.image()] * 2, controlnet_conditioning_scale=[1.0] * 3)
    with pytest.raises(ValueError, match="control_guidance_start=0.8 and control_guidance_end=0.2"):
        run(single[0], image=tiny.image(), control_guidance_start=0.8, control_guidance_end=0.2)


# -- SDXL ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    path = tiny.save_sdxl_controlnet_folder(tmp_path_factory.mktemp("tiny-sdxl-cn") / "pipe")
    return (quiet(diffloom.DiffusionPipeline.from_pretrained(path)),
            quiet(diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(path)))


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(guess_mode=True, prompt_2="a dog", negative_prompt="blurry"),
    dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.6, original_size=(64, 64),
         crops_coords_top_left=(8, 0)),
    dict(prompt=["a cat", "the red dog"], num_images_per_prompt=2, guidance_scale=1.0),
], ids=["cfg", "guess-mode", "window-microcond", "batch-no-cfg"])
def test_sdxl_controlnet(xl, kwargs):
    assert type(xl[0]) is diffloom.StableDiffusionXLControlNetPipeline
    compare(*xl, image=tiny.image(seed=1), **kwargs)


def test_sdxl_controlnet_cfg_cutoff_callback(xl):
    ours, ref = xl
    kwargs = dict(image=tiny.image(seed=1), num_inference_steps=4)
    a = run(ours, **kwargs, callback_on_step_end=diffloom.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5))
    b = run(ref, **kwargs,
            callback_on_step_end=diffusers.callbacks.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert_same(a, b)
    assert np.abs(a - run(ours, **kwargs)).max() > 1e-3
    # Any batch size: a batch of two is the two prompts cut off one by one.
    prompts = ["a cat", "the red dog"]
    callback = diffloom.SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=0.5)
    pair = ours(prompt=prompts, **kwargs, output_type="np", generator=[gen(3), gen(4)],
                callback_on_step_end=callback).images
    for k, (prompt, seed) in enumerate(zip(prompts, (3, 4))):
        assert_same(pair[k:k + 1], run(ours, seed, prompt=prompt, **kwargs, callback_on_step_end=callback))


def test_sdxl_auto_pipelines(xl):
    plain = AutoPipelineForText2Image.from_pipe(xl[0], controlnet=None)
    assert type(plain) is diffloom.StableDiffusionXLPipeline
    back = AutoPipelineForText2Image.from_pipe(plain, controlnet=xl[0].controlnet)
    assert type(back) is diffloom.StableDiffusionXLControlNetPipeline and back.unet is xl[0].unet
    assert_same(run(quiet(back), image=tiny.image(seed=1)), run(xl[0], image=tiny.image(seed=1)), tol=0)
