"""DDPM, DDIM and Stable Diffusion pipelines against diffusers, on tiny folders that diffusers wrote.

diffloom loads every folder with its own classes (UNets, VAE, schedulers, safety checker) through
``from_pretrained``; diffusers loads the same folder. Same seeds must give the same images (float32, within
1e-4), for every call option, scheduler and pipeline family.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import diffloom
import tiny
from diffloom import (AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image,
                      DDIMPipeline, DDPMPipeline, EulerDiscreteScheduler, SDCFGCutoffCallback,
                      StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                      hookimpl)
from diffloom.registry import registry

TOL = 1e-4
PROMPT = "a photo of the red cat"
H, W = tiny.IMAGE_HEIGHT, tiny.IMAGE_WIDTH


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def as_array(images):
    if isinstance(images, torch.Tensor):
        return images.float().numpy()
    if isinstance(images, list):
        return np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return np.asarray(images, dtype=np.float32)


def assert_same(a, b, tol=TOL):
    a, b = as_array(a), as_array(b)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tol, f"max abs difference {np.abs(a - b).max()}"


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def both(ours, ref, seed=0, **kwargs):
    """Run diffloom's and diffusers' pipelines with the same arguments and seed; returns both outputs."""
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np", **kwargs}
    if "image" not in kwargs or "mask_image" in kwargs:
        kwargs = {"height": H, "width": W, **kwargs}
    kw = dict(kwargs)
    if isinstance(seed, list):
        out = ours(**kw, generator=[gen(s) for s in seed]), ref(**kw, generator=[gen(s) for s in seed])
    else:
        out = ours(**kw, generator=gen(seed)), ref(**kw, generator=gen(seed))
    return out


def _run(pipe, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "height": H, "width": W, "output_type": "np",
              "generator": gen(seed), **kwargs}
    return pipe(**kwargs)


def compare(ours, ref, seed=0, **kwargs):
    a, b = both(ours, ref, seed, **kwargs)
    assert_same(a.images, b.images)
    return a, b


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    """(diffloom, diffusers) text-to-image pipelines of the tiny SD folder."""
    ours = quiet(StableDiffusionPipeline.from_pretrained(tiny_sd_path))
    ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path))
    return ours, ref


@pytest.fixture(scope="module")
def sd9(tiny_sd_inpaint_path):
    ours = quiet(StableDiffusionInpaintPipeline.from_pretrained(tiny_sd_inpaint_path))
    ref = quiet(diffusers.StableDiffusionInpaintPipeline.from_pretrained(tiny_sd_inpaint_path))
    return ours, ref


def test_loads_own_classes(sd):
    ours, _ = sd
    assert type(ours.unet).__module__.startswith("diffloom_models")
    assert type(ours.vae).__module__.startswith("diffloom_models")
    assert type(ours.scheduler).__module__.startswith("diffloom_schedulers")
    assert ours.vae_scale_factor == 8 and ours.image_processor.config.vae_scale_factor == 8


# -- DDPM / DDIM ------------------------------------------------------------------------------------------------


def test_ddpm(tiny_ddpm_path):
    ours, ref = quiet(DDPMPipeline.from_pretrained(tiny_ddpm_path)), quiet(diffusers.DDPMPipeline.from_pretrained(
        tiny_ddpm_path))
    assert type(ours.scheduler).__name__ == "DDPMScheduler"
    for kw in (dict(batch_size=2, output_type="np"), dict(batch_size=2, output_type="pt")):
        a = ours(num_inference_steps=4, generator=gen(1), **kw).images
        b = ref(num_inference_steps=4, generator=gen(1), **kw).images
        assert_same(a, b)
    a = ours(num_inference_steps=2, generator=[gen(1), gen(2)], batch_size=2).images
    b = ref(num_inference_steps=2, generator=[gen(1), gen(2)], batch_size=2).images
    assert isinstance(a[0], PIL.Image.Image) and a[0].size == (8, 8)
    assert_same(a, b, tol=0)


@pytest.mark.parametrize("eta,clipped", [(0.0, None), (1.0, True)])
def test_ddim(tiny_ddpm_path, eta, clipped):
    ours, ref = quiet(DDIMPipeline.from_pretrained(tiny_ddpm_path)), quiet(diffusers.DDIMPipeline.from_pretrained(
        tiny_ddpm_path))
    assert type(ours.scheduler).__name__ == "DDIMScheduler"  # the folder's DDPM config, as DDIM
    kw = dict(batch_size=2, eta=eta, use_clipped_model_output=clipped, num_inference_steps=4, output_type="np")
    assert_same(ours(generator=gen(3), **kw).images, ref(generator=gen(3), **kw).images)


def test_ddpm_errors(tiny_ddpm_path):
    pipe = quiet(DDPMPipeline.from_pretrained(tiny_ddpm_path))
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=2, generator=[gen(0)], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=2, output_type="latent")


# -- text-to-image ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(guidance_scale=7.5),
    dict(guidance_scale=1.0),
    dict(prompt=["a cat", "the red dog"], num_images_per_prompt=2, guidance_scale=6.0,
         negative_prompt=["blurry", "dark"]),
    dict(guidance_scale=9.0, guidance_rescale=0.7, negative_prompt="blurry"),
    dict(height=48, width=32, eta=0.5),
], ids=["cfg", "no-cfg", "batch", "rescale", "portrait"])
def test_txt2img(sd, kwargs):
    a, b = compare(*sd, **kwargs)
    assert a.images.shape[1:3] == (kwargs.get("height", H), kwargs.get("width", W))
    assert a.nsfw_content_detected is None and b.nsfw_content_detected is None


@pytest.mark.parametrize("output_type", ["pt", "latent", "pil"])
def test_output_types(sd, output_type):
    a, b = compare(*sd, output_type=output_type, num_inference_steps=2)
    if output_type == "pil":
        assert isinstance(a.images[0], PIL.Image.Image) and a.images[0].size == (W, H)
    else:
        channels = 4 if output_type == "latent" else 3
        scale = 8 if output_type == "latent" else 1
        assert a.images.shape == (1, channels, H // scale, W // scale)


def test_return_tuple_and_generator_list(sd):
    ours, ref = sd
    a = ours(PROMPT, num_inference_steps=2, height=H, width=W, output_type="np", num_images_per_prompt=3,
             generator=[gen(5), gen(6), gen(7)], return_dict=False)
    b = ref(PROMPT, num_inference_steps=2, height=H, width=W, output_type="np", num_images_per_prompt=3,
            generator=[gen(5), gen(6), gen(7)], return_dict=False)
    assert isinstance(a, tuple) and a[1] is None
    assert_same(a[0], b[0])
    # Each image comes from its own generator: image 1 is what seed 6 alone makes.
    single = ours(PROMPT, num_inference_steps=2, height=H, width=W, output_type="np", generator=gen(6)).images
    assert_same(a[0][1:2], single)


def test_prompt_embeds_and_latents(sd):
    ours, ref = sd
    embeds, negative = ours.encode_prompt(PROMPT, ours.device, 1, True, negative_prompt="dark")
    latents = torch.randn(1, 4, H // 8, W // 8, generator=gen(9))
    compare(ours, ref, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents)


def test_custom_timesteps_and_sigmas(sd):
    ours, ref = sd
    o = StableDiffusionPipeline.from_pipe(ours, scheduler=diffloom.EulerDiscreteScheduler.from_config(
        ours.scheduler.config))
    r = diffusers.StableDiffusionPipeline.from_pipe(ref, scheduler=diffusers.EulerDiscreteScheduler.from_config(
        ref.scheduler.config))
    quiet(o), quiet(r)
    compare(o, r, timesteps=[999, 600, 200])
    compare(o, r, sigmas=[14.0, 3.0, 0.5])
    with pytest.raises(ValueError, match="custom timesteps"):
        ours(PROMPT, timesteps=[999, 500], height=H, width=W)  # PNDM takes no custom schedule


def test_guidance_embedding_unet(tmp_path):
    """A UNet with time_cond_proj_dim takes the guidance scale as an embedding: no CFG batch."""
    path = tiny.save_sd_folder(tmp_path / "lcm", time_cond_proj_dim=8)
    ours = quiet(StableDiffusionPipeline.from_pretrained(path))
    ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained(path))
    seen = []

    class Spy:
        @hookimpl
        def before_denoiser(self, pipe, call, step):
            seen.append(step.model_input.shape[0])

    a, b = both(ours, ref, guidance_scale=6.0, hooks=[Spy()])
    assert_same(a.images, b.images)
    assert seen and set(seen) == {1}
    a2 = ours(PROMPT, num_inference_steps=3, height=H, width=W, output_type="np", guidance_scale=2.0,
              generator=gen(0)).images
    assert np.abs(a2 - a.images).max() > 1e-3  # the scale reaches the UNet


def test_clip_skip(sd):
    """clip_skip=1 uses the penultimate CLIP layer, through the final layer norm.

    diffusers 0.42 fails on clip_skip with transformers 5 (it looks for ``text_encoder.text_model``), so the
    reference gets the embeddings computed here by hand.
    """
    ours, ref = sd
    ids = ours.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        manual = ref.text_encoder.final_layer_norm(hidden)
    a = ours(PROMPT, clip_skip=1, num_inference_steps=3, height=H, width=W, output_type="np", generator=gen(0))
    b = ref(prompt_embeds=manual, num_inference_steps=3, height=H, width=W, output_type="np", generator=gen(0))
    assert_same(a.images, b.images)
    plain = ours(PROMPT, num_inference_steps=3, height=H, width=W, output_type="np", generator=gen(0)).images
    assert np.abs(plain - a.images).max() > 1e-3


def test_long_prompt_truncated_with_warning(sd, caplog):
    long_prompt = "a photo of the red cat " * 13 + "and a dog at the end"  # 78 + 6 tokens
    with caplog.at_level(logging.WARNING, logger="diffloom_pipelines"):
        compare(*sd, prompt=long_prompt, num_inference_steps=2)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("diffloom_pipelines")]
    assert any("dropped" in m and "dog" in m and "end" in m for m in messages), messages


# -- schedulers --------------------------------------------------------------------------------------------------

SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_swap(sd, name):
    ours, ref = sd
    o = quiet(StableDiffusionPipeline.from_pipe(ours, scheduler=getattr(diffloom, name).from_config(
        ours.scheduler.config)))
    r = quiet(diffusers.StableDiffusionPipeline.from_pipe(ref, scheduler=getattr(diffusers, name).from_config(
        ref.scheduler.config)))
    assert type(o.scheduler).__module__.startswith("diffloom_schedulers")
    compare(o, r, num_inference_steps=4, eta=1.0)


# -- image-to-image and the latents hand-over --------------------------------------------------------------------


@pytest.fixture(scope="module")
def img2img(sd):
    ours, ref = sd
    return (quiet(StableDiffusionImg2ImgPipeline.from_pipe(ours)),
            quiet(diffusers.StableDiffusionImg2ImgPipeline.from_pipe(ref)))


@pytest.mark.parametrize("kwargs", [
    dict(strength=0.6),
    dict(strength=1.0, guidance_scale=1.0),
    dict(prompt=["a cat", "a dog"], num_images_per_prompt=2, strength=0.5),
], ids=["cfg", "no-cfg-full-strength", "batch"])
def test_img2img(img2img, kwargs):
    compare(*img2img, image=tiny.image(), num_inference_steps=4, **kwargs)


def test_img2img_inputs(img2img):
    """The same picture as PIL, numpy HWC and torch CHW gives the same result; a generator list works."""
    pil = tiny.image(seed=2)
    array = np.asarray(pil, dtype=np.float32) / 255
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    ours, ref = img2img
    reference = both(ours, ref, image=pil, strength=0.7)
    assert_same(*[r.images for r in reference])
    for image in (array, tensor, [pil]):
        assert_same(ours(PROMPT, image=image, strength=0.7, num_inference_steps=3, output_type="np",
                         generator=gen(0)).images, reference[0].images)
    compare(ours, ref, seed=[4, 5], image=[pil, tiny.image(seed=3)], prompt=["a cat", "a dog"], strength=0.7)


def test_latents_from_one_pipeline_to_the_next(sd, img2img):
    """txt2img with output_type="latent", then img2img on those latents (they skip the VAE encoder)."""
    ours, ref = sd
    a, b = both(ours, ref, output_type="latent", num_inference_steps=2)
    assert_same(a.images, b.images)
    a2 = img2img[0](PROMPT, image=a.images, strength=0.5, num_inference_steps=4, output_type="np", generator=gen(1))
    b2 = img2img[1](PROMPT, image=b.images, strength=0.5, num_inference_steps=4, output_type="np", generator=gen(1))
    assert_same(a2.images, b2.images)
    assert a2.images.shape == (1, H, W, 3)


# -- inpainting ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(strength=0.7, guidance_scale=1.0),
    dict(prompt=["a cat", "a dog"], num_images_per_prompt=2, strength=0.8),
    dict(padding_mask_crop=2, output_type="pil"),
], ids=["cfg", "partial-strength", "batch", "mask-crop"])
def test_inpaint_9_channels(sd9, kwargs):
    compare(*sd9, image=tiny.image(), mask_image=tiny.mask(), num_inference_steps=4, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(), dict(strength=0.7), dict(guidance_scale=1.0, num_images_per_prompt=2)],
                         ids=["cfg", "partial-strength", "no-cfg"])
def test_inpaint_4_channels(sd, kwargs):
    ours, ref = sd
    o = quiet(StableDiffusionInpaintPipeline.from_pipe(ours))
    r = quiet(diffusers.StableDiffusionInpaintPipeline.from_pipe(ref))
    a, _ = compare(o, r, image=tiny.image(), mask_image=tiny.mask(), num_inference_steps=4, **kwargs)
    # Outside the mask the original survives (up to the VAE round trip, which the tiny VAE does badly):
    # what matters is that the blend ran, so the result differs from plain text-to-image.
    plain = ours(PROMPT, num_inference_steps=4, height=H, width=W, output_type="np", generator=gen(0),
                 guidance_scale=kwargs.get("guidance_scale", 7.5)).images
    assert np.abs(plain - a.images[:1]).max() > 1e-3


def test_inpaint_mask_formats_and_callback_tensors(sd9):
    ours, ref = sd9
    mask = tiny.mask()
    as_array_mask = np.asarray(mask, dtype=np.float32) / 255
    base = ours(PROMPT, image=tiny.image(), mask_image=mask, num_inference_steps=3, output_type="np",
                height=H, width=W, generator=gen(0)).images
    for m in (as_array_mask, torch.from_numpy(as_array_mask)[None]):
        out = ours(PROMPT, image=tiny.image(), mask_image=m, num_inference_steps=3, output_type="np", height=H,
                   width=W, generator=gen(0)).images
        assert_same(out, base)

    def grab(pipe, i, t, kwargs):
        seen.append({k: v.shape for k, v in kwargs.items()})
        return kwargs

    seen = []
    ours(PROMPT, image=tiny.image(), mask_image=mask, num_inference_steps=2, height=H, width=W, output_type="np",
         callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["mask", "masked_image_latents", "latents"])
    assert seen[0] == {"mask": (2, 1, H // 8, W // 8), "masked_image_latents": (2, 4, H // 8, W // 8),
                       "latents": (1, 4, H // 8, W // 8)}


# -- callbacks, interrupt, hooks ----------------------------------------------------------------------------------


def test_callback_turns_guidance_off(sd):
    def dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        if step_index == int(pipe.num_timesteps * 0.4):
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    kw = dict(num_inference_steps=5, callback_on_step_end=dynamic_cfg,
              callback_on_step_end_tensor_inputs=["prompt_embeds"])
    a, _ = compare(*sd, **kw)
    b = _run(sd[0], num_inference_steps=5, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    c = _run(sd[1], num_inference_steps=5,
             callback_on_step_end=diffusers.callbacks.SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    assert_same(a.images, b.images)
    assert_same(b.images, c.images)
    plain = sd[0](PROMPT, num_inference_steps=5, height=H, width=W, output_type="np", generator=gen(0)).images
    assert np.abs(plain - a.images).max() > 1e-3


def test_interrupt(sd):
    def stop(pipe, i, t, kwargs):
        if i == 1:
            pipe._interrupt = True
        return kwargs

    compare(*sd, num_inference_steps=4, callback_on_step_end=stop)


def test_hooks_fire_in_order(sd):
    events = []

    class Recorder:
        @hookimpl
        def on_call_start(self, pipe, call):
            events.append("start")
            assert "prompt_embeds" not in call.tensors

        @hookimpl
        def before_denoiser(self, pipe, call, step):
            events.append("before")
            assert step.conditioning["encoder_hidden_states"] is call.tensors["prompt_embeds"]
            assert step.model_input.shape[0] == 2  # the CFG batch

        @hookimpl
        def after_decode(self, pipe, call, images):
            events.append("decode")
            assert images.min() < 0  # still in [-1, 1]

        @hookimpl
        def on_call_end(self, pipe, call, output):
            events.append("end")
            assert output.images.shape == (1, H, W, 3)

    sd[0](PROMPT, num_inference_steps=2, height=H, width=W, output_type="np", hooks=[Recorder()])
    assert events == ["start"] + ["before"] * sd[0].num_timesteps + ["decode", "end"]


def test_threads_share_one_pipeline(sd):
    """One pipeline, four threads, different seeds and callbacks: each gets its single-threaded image."""
    pipe = sd[0]

    def run(seed):
        callback = SDCFGCutoffCallback(cutoff_step_ratio=0.5) if seed % 2 else None
        return pipe(PROMPT, num_inference_steps=4, height=H, width=W, output_type="np", generator=gen(seed),
                    callback_on_step_end=callback).images

    shared_timesteps = pipe.scheduler.timesteps
    expected = [run(seed) for seed in range(4)]
    barrier = threading.Barrier(4)

    def threaded(seed):
        barrier.wait()
        return run(seed)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(threaded, range(4)))
    for got, want in zip(results, expected):
        assert_same(got, want, tol=0)
    assert pipe.scheduler.timesteps is shared_timesteps  # each call stepped its own scheduler copy


# -- safety checker --------------------------------------------------------------------------------------------


def test_safety_checker_flags_and_blackens(sd, tmp_path, caplog):
    from diffloom_pipelines.safety_checker import StableDiffusionSafetyChecker

    ours, ref = sd
    kw = dict(num_inference_steps=2, num_images_per_prompt=2)
    clean = ours(PROMPT, height=H, width=W, output_type="np", generator=[gen(0), gen(1)], **kw).images
    checker, extractor = tiny.diffusers_safety_checker(seed=5)
    tiny.arrange_to_flag(checker, extractor, clean, [True, False])
    checker.save_pretrained(tmp_path / "checker")
    our_checker = StableDiffusionSafetyChecker.from_pretrained(tmp_path / "checker")
    o = quiet(StableDiffusionPipeline.from_pipe(ours, safety_checker=our_checker, feature_extractor=extractor,
                                                requires_safety_checker=True))
    r = quiet(diffusers.StableDiffusionPipeline.from_pipe(ref, safety_checker=checker, feature_extractor=extractor,
                                                          requires_safety_checker=True))
    with caplog.at_level(logging.WARNING):
        for output_type in ("np", "pil"):
            a, b = both(o, r, seed=[0, 1], output_type=output_type, **kw)
            assert a.nsfw_content_detected == b.nsfw_content_detected == [True, False]
            assert_same(a.images, b.images)
            assert as_array(a.images)[0].max() == 0  # black
            assert as_array(a.images)[1].max() > 0
    assert any("NSFW" in r.getMessage() for r in caplog.records)

    # Saved with the checker, the folder loads in diffusers and gives the same flags and images.
    o.save_pretrained(tmp_path / "saved")
    back = quiet(diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "saved"))
    c, d = both(o, back, seed=[0, 1], **kw)
    assert d.nsfw_content_detected == [True, False]
    assert_same(c.images, d.images)


def test_no_safety_checker_warns(sd, caplog):
    with caplog.at_level(logging.WARNING, logger="diffloom_pipelines"):
        StableDiffusionPipeline.from_pipe(sd[0], safety_checker=None, requires_safety_checker=True)
    assert any("without a safety checker" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffloom_pipelines"):
        StableDiffusionPipeline.from_pipe(sd[0], safety_checker=None, requires_safety_checker=False)
    assert not caplog.records
    with pytest.raises(ValueError, match="feature_extractor"):
        StableDiffusionPipeline.from_pipe(sd[0], safety_checker=torch.nn.Identity(), feature_extractor=None)


# -- saving ----------------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip(sd, tmp_path):
    ours, _ = sd
    ours.save_pretrained(tmp_path / "out")
    back = quiet(diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "out"))
    again = quiet(StableDiffusionPipeline.from_pretrained(tmp_path / "out"))
    a, b = both(ours, back)
    assert_same(a.images, b.images)
    assert_same(again(PROMPT, num_inference_steps=3, height=H, width=W, output_type="np", generator=gen(0)).images,
                a.images, tol=0)


# -- AutoPipelines ---------------------------------------------------------------------------------------------


def test_auto_from_pretrained(tiny_sd_path, tiny_sd_inpaint_path):
    assert type(AutoPipelineForText2Image.from_pretrained(tiny_sd_path)) is StableDiffusionPipeline
    assert type(AutoPipelineForImage2Image.from_pretrained(tiny_sd_path)) is StableDiffusionImg2ImgPipeline
    inpaint = AutoPipelineForInpainting.from_pretrained(tiny_sd_path)
    assert type(inpaint) is StableDiffusionInpaintPipeline and inpaint.unet.config.in_channels == 4
    # An inpainting folder still belongs to the family: its text-to-image pipeline is the plain one.
    assert type(AutoPipelineForText2Image.from_pretrained(tiny_sd_inpaint_path)) is StableDiffusionPipeline
    assert type(diffloom.DiffusionPipeline.from_pretrained(tiny_sd_inpaint_path)) is StableDiffusionInpaintPipeline
    ours = quiet(AutoPipelineForInpainting.from_pretrained(tiny_sd_inpaint_path))
    ref = quiet(diffusers.AutoPipelineForInpainting.from_pretrained(tiny_sd_inpaint_path))
    compare(ours, ref, image=tiny.image(), mask_image=tiny.mask(), num_inference_steps=2)


def test_auto_from_pipe_shares_modules(sd):
    ours, ref = sd
    chain = [AutoPipelineForImage2Image.from_pipe(ours)]
    chain.append(AutoPipelineForInpainting.from_pipe(chain[0]))
    chain.append(AutoPipelineForText2Image.from_pipe(chain[1]))
    assert [type(p) for p in chain] == [StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                                        StableDiffusionPipeline]
    for pipe in chain:
        for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
            assert getattr(pipe, name) is getattr(ours, name)
    i2i = quiet(chain[0])
    ref_i2i = quiet(diffusers.AutoPipelineForImage2Image.from_pipe(ref))
    compare(i2i, ref_i2i, image=tiny.image(), strength=0.6)


def test_auto_errors_and_registration(tiny_ddpm_path, sd):
    with pytest.raises(ValueError, match="DDPMPipeline"):
        AutoPipelineForImage2Image.from_pretrained(tiny_ddpm_path)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoPipelineForText2Image()

    class MyText2Image(StableDiffusionPipeline):
        pass

    class MyImage2Image(StableDiffusionImg2ImgPipeline):
        pass

    class Plugin:
        @hookimpl
        def register_pipelines(self, register):
            register("MyText2Image", MyText2Image, family="my-family", task="text2image")
            register("MyImage2Image", MyImage2Image, family="my-family", task="image2image")

    name = registry.register_plugin(Plugin(), name="test-auto-family")
    try:
        mine = MyText2Image(**sd[0].components)
        assert type(AutoPipelineForImage2Image.from_pipe(mine)) is MyImage2Image
        with pytest.raises(ValueError, match="inpaint for the 'my-family' family"):
            AutoPipelineForInpainting.from_pipe(mine)
    finally:
        registry.unregister_plugin(name)


# -- errors ----------------------------------------------------------------------------------------------------




@pytest.mark.parametrize("kwargs,match", [
    (dict(height=36), "divisible by 8"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), "prompt or prompt_embeds"),
    (dict(prompt=None), "prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["c"]), "negative_prompt has 1 entries"),
    (dict(prompt=3), "str or a list"),
    (dict(num_images_per_prompt=2, generator=[gen(0)]), "1 generators for 2 images"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), "latents have shape"),
    (dict(callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs=["mask"]), "mask"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(1, 70, 32)),
     "same shape"),
], ids=["size", "prompt-and-embeds", "no-prompt", "negative-batch", "prompt-type", "generators", "output-type",
        "latents-shape", "callback-tensor", "embeds-shape"])
def test_txt2img_errors(sd, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(sd[0], num_inference_steps=2, **kwargs)


def test_img2img_strength_below_one_step_runs_pndms_final_timestep(img2img):
    # int(3 * 0.1) = 0 whole steps remain, but PNDM's schedule ends with one more timestep, which diffusers runs.
    a, b = compare(*img2img, image=tiny.image(), strength=0.1)
    assert as_array(a.images).std() > 0


def test_image_pipeline_errors(img2img, sd9):
    i2i = img2img[0]
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"strength must be in \[0.0, 1.0\]"):
            i2i(PROMPT, image=tiny.image(), strength=strength)
    euler = StableDiffusionImg2ImgPipeline.from_pipe(i2i, scheduler=EulerDiscreteScheduler.from_config(
        i2i.scheduler.config))
    with pytest.raises(ValueError, match="leaves 0 denoising steps"):
        euler(PROMPT, image=tiny.image(), strength=0.1, num_inference_steps=3)
    with pytest.raises(ValueError, match="needs an image"):
        i2i(PROMPT)
    with pytest.raises(ValueError, match="2 generators for 1 images"):
        i2i(PROMPT, image=tiny.image(), num_inference_steps=2, generator=[gen(0), gen(1)])
    with pytest.raises(ValueError, match="2 images"):
        i2i(PROMPT, image=[tiny.image()] * 2, num_images_per_prompt=3, num_inference_steps=2)
    inpaint = sd9[0]
    common = dict(prompt=PROMPT, num_inference_steps=2, height=H, width=W)
    with pytest.raises(ValueError, match="mask_image does not match image"):
        inpaint(image=[tiny.image()] * 2, mask_image=[tiny.mask()] * 3, **common)
    with pytest.raises(ValueError, match="needs a mask_image"):
        inpaint(image=tiny.image(), **common)
    with pytest.raises(ValueError, match="strength"):
        inpaint(image=tiny.image(), mask_image=tiny.mask(), strength=2.0, **common)
    with pytest.raises(ValueError, match="output_type='pil'"):
        inpaint(image=tiny.image(), mask_image=tiny.mask(), padding_mask_crop=4, output_type="np", **common)
    with pytest.raises(ValueError, match="PIL image"):
        inpaint(image=np.zeros((H, W, 3)), mask_image=tiny.mask(), padding_mask_crop=4, **common)
    with pytest.raises(ValueError, match="divisible by 8"):
        inpaint(image=tiny.image(), mask_image=tiny.mask(), **{**common, "width": 44})
