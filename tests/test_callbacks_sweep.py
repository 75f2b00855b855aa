"""callback_on_step_end across every pipeline against diffusers: the allowed tensor names, the tensors handed to
the callback at each step, the effect of returned tensors, the official cutoff callbacks, interrupting, and
changing the guidance scale mid-run."""

import inspect
import warnings

import diffusers
import diffusers.callbacks
import numpy as np
import pytest
import torch

import diffloom
import tiny
from diffloom import (MultiPipelineCallbacks, SDCFGCutoffCallback, SDXLCFGCutoffCallback,
                      SDXLControlnetCFGCutoffCallback)

PROMPT = "a photo of the red cat"
H, W = tiny.IMAGE_HEIGHT, tiny.IMAGE_WIDTH
LOW = dict(height=8, width=12)
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name -> (folder writer, extra folder kwargs, diffusers class, call arguments)
CASES = {
    "sd": (tiny.save_sd_folder, {}, diffusers.StableDiffusionPipeline, lambda: dict(height=H, width=W)),
    "sd-img2img": (tiny.save_sd_folder, {}, diffusers.StableDiffusionImg2ImgPipeline,
                   lambda: dict(image=tiny.image(), strength=0.99)),
    "sd-inpaint4": (tiny.save_sd_folder, {}, diffusers.StableDiffusionInpaintPipeline,
                    lambda: dict(image=tiny.image(), mask_image=tiny.mask(), height=H, width=W, strength=0.99)),
    "sd-inpaint9": (tiny.save_sd_folder, dict(in_channels=9), diffusers.StableDiffusionInpaintPipeline,
                    lambda: dict(image=tiny.image(), mask_image=tiny.mask(), height=H, width=W)),
    "sdxl": (tiny.save_sdxl_folder, {}, diffusers.StableDiffusionXLPipeline, lambda: dict(height=H, width=W)),
    "sdxl-img2img": (tiny.save_sdxl_folder, {}, diffusers.StableDiffusionXLImg2ImgPipeline,
                     lambda: dict(image=tiny.image(), strength=0.99)),
    "sdxl-inpaint": (tiny.save_sdxl_folder, dict(in_channels=9), diffusers.StableDiffusionXLInpaintPipeline,
                     lambda: dict(image=tiny.image(), mask_image=tiny.mask(), height=H, width=W)),
    "controlnet": (tiny.save_sd_controlnet_folder, {}, diffusers.StableDiffusionControlNetPipeline,
                   lambda: dict(image=tiny.image(seed=1))),
    "sdxl-controlnet": (tiny.save_sdxl_controlnet_folder, {}, diffusers.StableDiffusionXLControlNetPipeline,
                        lambda: dict(image=tiny.image(seed=1))),
    "depth2img": (tiny.save_depth2img_folder, {}, diffusers.StableDiffusionDepth2ImgPipeline,
                  lambda: dict(image=tiny.image(), strength=0.99)),
}


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


_loaded = {}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    def load(name):
        if name not in _loaded:
            writer, folder_kwargs, ref_class, _ = CASES[name]
            key = (writer, tuple(sorted(folder_kwargs.items())))
            path = _loaded.get(key) or writer(tmp_path_factory.mktemp(name) / "pipe", **folder_kwargs)
            _loaded[key] = path
            ours = quiet(diffloom.DiffusionPipeline.from_pretrained(path))
            if ref_class.__name__ != type(ours).__name__:
                ours = quiet(getattr(diffloom, ref_class.__name__).from_pretrained(path))
            _loaded[name] = ours, quiet(ref_class.from_pretrained(path))
        return _loaded[name]

    yield load
    _loaded.clear()


def run(pipe, name, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 3, "output_type": "np",
              "generator": torch.Generator().manual_seed(seed), **CASES[name][3](), **kwargs}
    return pipe(**kwargs).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


class Recorder:
    """Records every tensor handed to it, per step; optionally edits them through ``edit``."""

    def __init__(self, edit=None):
        self.seen, self.edit = [], edit

    def __call__(self, pipe, i, t, kwargs):
        self.seen.append((i, float(t), pipe.num_timesteps, {k: v.clone() for k, v in kwargs.items()}))
        return self.edit(pipe, i, kwargs) if self.edit else kwargs


@pytest.mark.parametrize("name", CASES)
def test_tensors_handed_to_the_callback(pipes, name):
    ours, ref = pipes(name)
    assert ours._callback_tensor_inputs == ref._callback_tensor_inputs
    names = list(ref._callback_tensor_inputs)
    a, b = Recorder(), Recorder()
    run(ours, name, callback_on_step_end=a, callback_on_step_end_tensor_inputs=names, output_type="latent")
    run(ref, name, callback_on_step_end=b, callback_on_step_end_tensor_inputs=names, output_type="latent")
    assert len(a.seen) == len(b.seen) > 0
    for (i, t, n, x), (j, u, m, y) in zip(a.seen, b.seen):
        assert (i, n) == (j, m) and abs(t - u) < 1e-6
        assert list(x) == list(y) == names
        for key in names:
            assert x[key].shape == y[key].shape, (name, i, key)
            assert max_diff(x[key], y[key]) <= TOL, (name, i, key)


def _edit_all(pipe, i, kwargs):
    """Scales every tensor it is given at step 0 (masks, embeddings, time ids, control images alike)."""
    if i == 0:
        for key, value in kwargs.items():
            kwargs[key] = value * (0.5 if key == "latents" else 0.8) if value.is_floating_point() else value
    return kwargs


@pytest.mark.parametrize("name", CASES)
def test_returned_tensors_take_effect_like_diffusers(pipes, name):
    ours, ref = pipes(name)
    names = list(ref._callback_tensor_inputs)
    x = run(ours, name, callback_on_step_end=Recorder(_edit_all), callback_on_step_end_tensor_inputs=names)
    y = run(ref, name, callback_on_step_end=Recorder(_edit_all), callback_on_step_end_tensor_inputs=names)
    assert max_diff(x, y) <= TOL
    assert max_diff(x, run(ours, name)) > 1e-3


UPSCALERS = {
    "x4": (tiny.save_x4_upscaler_folder, diffusers.StableDiffusionUpscalePipeline,
           lambda: dict(image=tiny.image(**LOW, seed=3))),
    "latent-x2": (tiny.save_latent_upscaler_folder, diffusers.StableDiffusionLatentUpscalePipeline,
                  lambda: dict(image=tiny.image())),
}


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    loaded = {}

    def load(name):
        if name not in loaded:
            writer, ref_class, _ = UPSCALERS[name]
            path = writer(tmp_path_factory.mktemp(name) / "pipe")
            loaded[name] = (quiet(getattr(diffloom, ref_class.__name__).from_pretrained(path)),
                            quiet(ref_class.from_pretrained(path)))
        return loaded[name]

    return load


def _old_style(pipe, **kwargs):
    """Runs with ``callback=``; returns the images, the calls seen and the names of the FutureWarnings raised."""
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe(prompt=PROMPT, num_inference_steps=3, output_type="np",
                      generator=torch.Generator().manual_seed(0),
                      callback=lambda i, t, latents: calls.append((i, float(t), latents.clone())), **kwargs).images
    return images, calls, sorted(str(w.message).split("`")[1] for w in caught if w.category is FutureWarning)


def _compare_old_style(ours, ref, kwargs):
    (x, a, wa), (y, b, wb) = _old_style(ours, **kwargs), _old_style(ref, **kwargs)
    assert max_diff(x, y) <= TOL
    assert wa == wb == []
    assert [(i, t) for i, t, _ in a] == [(i, t) for i, t, _ in b] and a
    for (_, _, la), (_, _, lb) in zip(a, b):
        assert max_diff(la, lb) <= TOL


@pytest.mark.parametrize("name", UPSCALERS)
def test_upscaler_step_callback(upscalers, name):
    """The upscalers keep the old callback=/callback_steps= arguments (not deprecated there), in diffusers'
    positions, called where diffusers' progress bar advances."""
    ours, ref = upscalers(name)
    params = [p for p in inspect.signature(type(ref).__call__).parameters]
    assert [p for p in inspect.signature(type(ours).__call__).parameters][:len(params)] == params
    for steps in (1, 2):
        _compare_old_style(ours, ref, dict(UPSCALERS[name][2](), callback_steps=steps))
    with pytest.raises(ValueError, match="callback_steps"):
        ours(PROMPT, **UPSCALERS[name][2](), num_inference_steps=2, callback=print, callback_steps=None)


CUTOFFS = [
    ("sd-img2img", SDCFGCutoffCallback, diffusers.callbacks.SDCFGCutoffCallback),
    ("sdxl", SDXLCFGCutoffCallback, diffusers.callbacks.SDXLCFGCutoffCallback),
    ("sdxl-img2img", SDXLCFGCutoffCallback, diffusers.callbacks.SDXLCFGCutoffCallback),
    ("sdxl-controlnet", SDXLControlnetCFGCutoffCallback, diffusers.callbacks.SDXLControlnetCFGCutoffCallback),
]


@pytest.mark.parametrize("name,ours_class,ref_class", CUTOFFS, ids=[c[0] for c in CUTOFFS])
def test_official_cutoff_callbacks(pipes, name, ours_class, ref_class):
    ours, ref = pipes(name)
    for cutoff in (dict(cutoff_step_ratio=0.5), dict(cutoff_step_ratio=None, cutoff_step_index=1)):
        x = run(ours, name, num_inference_steps=4, callback_on_step_end=ours_class(**cutoff))
        y = run(ref, name, num_inference_steps=4, callback_on_step_end=ref_class(**cutoff))
        assert max_diff(x, y) <= TOL, cutoff
    assert max_diff(x, run(ours, name, num_inference_steps=4)) > 1e-4


BROKEN_CUTOFFS = [
    ("sd-inpaint4", SDCFGCutoffCallback, diffusers.callbacks.SDCFGCutoffCallback),
    ("sd-inpaint9", SDCFGCutoffCallback, diffusers.callbacks.SDCFGCutoffCallback),
    ("sdxl-inpaint", SDXLCFGCutoffCallback, diffusers.callbacks.SDXLCFGCutoffCallback),
    ("controlnet", SDCFGCutoffCallback, diffusers.callbacks.SDCFGCutoffCallback),
]


@pytest.mark.parametrize("name,ours_class,ref_class", BROKEN_CUTOFFS, ids=[c[0] for c in BROKEN_CUTOFFS])
def test_cutoff_fails_where_other_inputs_stay_cfg_batched(pipes, name, ours_class, ref_class):
    """The cutoff callbacks halve the text inputs only; the mask, masked-image latents or control image stay
    doubled, so a later step fails, in diffusers and here."""
    for pipe, callback in zip(pipes(name), (ours_class, ref_class)):
        with pytest.raises(RuntimeError, match="size"):
            run(pipe, name, num_inference_steps=4,
                callback_on_step_end=callback(cutoff_step_ratio=None, cutoff_step_index=1))


def test_multi_callbacks_on_sdxl(pipes):
    ours, ref = pipes("sdxl")

    def scale_time_ids(pipe, i, kwargs):
        if i == 0:
            kwargs["add_time_ids"] = kwargs["add_time_ids"] * 2
        return kwargs

    class TimeIds(diffloom.PipelineCallback):
        tensor_inputs = ["add_time_ids", "latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return scale_time_ids(pipeline, step_index, callback_kwargs)

    class RefTimeIds(diffusers.callbacks.PipelineCallback):
        tensor_inputs = ["add_time_ids", "latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return scale_time_ids(pipeline, step_index, callback_kwargs)

    x = run(ours, "sdxl", callback_on_step_end=MultiPipelineCallbacks(
        [TimeIds(), SDXLCFGCutoffCallback(cutoff_step_ratio=0.6)]))
    y = run(ref, "sdxl", callback_on_step_end=diffusers.callbacks.MultiPipelineCallbacks(
        [RefTimeIds(), diffusers.callbacks.SDXLCFGCutoffCallback(cutoff_step_ratio=0.6)]))
    assert max_diff(x, y) <= TOL


def test_callback_config_round_trips_with_diffusers(tmp_path):
    SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=3).save_config(tmp_path)
    assert diffusers.callbacks.SDXLCFGCutoffCallback.from_config(
        diffusers.callbacks.SDXLCFGCutoffCallback.load_config(tmp_path)).config.cutoff_step_index == 3


def _interrupt_at_1(pipe, i, t, kwargs):
    if i == 1:
        pipe._interrupt = True
    return kwargs


def _guidance_to_2(pipe, i, t, kwargs):
    if i == 0:
        pipe._guidance_scale = 2.0
    return kwargs


@pytest.mark.parametrize("name", ["sd-inpaint4", "sdxl-img2img", "controlnet", "sdxl-controlnet"])
def test_interrupt_and_guidance_change(pipes, name):
    ours, ref = pipes(name)
    for callback in (_interrupt_at_1, _guidance_to_2):
        x = run(ours, name, num_inference_steps=4, callback_on_step_end=callback)
        y = run(ref, name, num_inference_steps=4, callback_on_step_end=callback)
        assert max_diff(x, y) <= TOL, callback.__name__
        # diffusers' SDXL ControlNet pipeline keeps scaling by the guidance_scale it was called with: a new
        # pipe._guidance_scale above 1 changes nothing there.
        unchanged = name == "sdxl-controlnet" and callback is _guidance_to_2
        assert (max_diff(x, run(ours, name, num_inference_steps=4)) > 1e-4) != unchanged
    assert ours.num_timesteps == ref.num_timesteps and ours._interrupt == ref._interrupt


@pytest.mark.parametrize("name", CASES)
def test_a_name_the_pipeline_does_not_provide(pipes, name):
    ours, ref = pipes(name)
    for pipe in (ours, ref):
        with pytest.raises(ValueError, match="not_a_tensor"):
            run(pipe, name, num_inference_steps=1, callback_on_step_end=lambda p, i, t, k: k,
                callback_on_step_end_tensor_inputs=["latents", "not_a_tensor"])


def _deprecated_style(pipe, name, **kwargs):
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = run(pipe, name, callback=lambda i, t, latents: calls.append((i, float(t), latents.clone())),
                     **kwargs)
    return images, calls, any(w.category is FutureWarning and "callback" in str(w.message) for w in caught)


@pytest.mark.parametrize("name", CASES)
def test_deprecated_step_callback(pipes, name):
    """diffusers still takes callback=/callback_steps= here, warning that they are going away: so does diffloom."""
    ours, ref = pipes(name)
    (x, a, warned_a), (y, b, warned_b) = (_deprecated_style(p, name, callback_steps=2) for p in (ours, ref))
    assert warned_a and warned_b and max_diff(x, y) <= TOL
    assert [(i, t) for i, t, _ in a] == [(i, t) for i, t, _ in b] and a
    assert all(max_diff(la, lb) <= TOL for (_, _, la), (_, _, lb) in zip(a, b))
