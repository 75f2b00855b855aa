"""MarigoldDepthPipeline (contrib) against diffusers' core MarigoldDepthPipeline, on a tiny seeded folder that
diffusers writes: predictions, uncertainties and latents for every input kind and call option, the ensembling
solver on its own, the image processor's pictures, and the errors."""

import logging

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.marigold import MarigoldImageProcessor as RefImageProcessor

import tiny
from diffloom import DiffusionPipeline, LCMScheduler, hookimpl
from diffloom_contrib.marigold_depth_pipeline import MarigoldDepthPipeline, MarigoldImageProcessor

# Marigold v1.1's scheduler: DDIM, v-prediction, trailing timesteps.
DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
            timestep_spacing="trailing")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("marigold-depth")
    tokenizer = tiny.clip_tokenizer(root / "vocab")
    torch.manual_seed(0)
    unet = tiny._perturbed(diffusers.UNet2DConditionModel(**tiny.unet_config(in_channels=8)), 1)
    vae = tiny._perturbed(diffusers.AutoencoderKL(**tiny.vae_config()), 2)
    pipe = diffusers.MarigoldDepthPipeline(unet=unet, vae=vae, scheduler=diffusers.DDIMScheduler(**DDIM),
                                           text_encoder=tiny.clip_text_encoder(tokenizer, 3), tokenizer=tokenizer,
                                           prediction_type="depth", default_denoising_steps=2,
                                           default_processing_resolution=32)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def pipes(folder):
    ref = diffusers.MarigoldDepthPipeline.from_pretrained(folder)
    ours = MarigoldDepthPipeline.from_pretrained(folder)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    return ref, ours


def image(height=30, width=45, seed=0):  # sides that are not multiples of 8: the VAE input is padded
    return tiny.image(height, width, seed)


def seeded(seed, count=None):
    if count is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + k) for k in range(count)]


def fields(out):
    """(prediction, uncertainty, latent) of an output object or of the tuple return_dict=False gives."""
    return out if isinstance(out, tuple) else (out.prediction, out.uncertainty, out.latent)


def assert_same(ref_out, our_out):
    for name, expected, got in zip(("prediction", "uncertainty", "latent"), fields(ref_out), fields(our_out)):
        assert (expected is None) == (got is None), name
        if expected is not None:
            assert type(got) is type(expected) and got.shape == expected.shape, name
            diff = (torch.as_tensor(got).float() - torch.as_tensor(expected).float()).abs().max().item()
            assert diff == 0.0, (name, diff)


def test_loads_the_diffusers_folder_by_class_name_and_writes_it_back(folder, pipes, tmp_path):
    _, ours = pipes
    assert type(DiffusionPipeline.from_pretrained(folder)) is MarigoldDepthPipeline
    keys = ("prediction_type", "scale_invariant", "shift_invariant", "default_denoising_steps",
            "default_processing_resolution")
    assert [ours.config[k] for k in keys] == ["depth", True, True, 2, 32]
    assert (ours.scale_invariant, ours.default_processing_resolution) == (True, 32)
    assert ours.image_processor.config.vae_scale_factor == ours.vae_scale_factor == 8
    ours.save_pretrained(tmp_path / "again")
    back = diffusers.MarigoldDepthPipeline.from_pretrained(tmp_path / "again")
    assert [back.config[k] for k in keys] == ["depth", True, True, 2, 32]


CALLS = {
    "defaults": dict(),
    "ensemble_median": dict(ensemble_size=3, output_uncertainty=True, output_latent=True),
    "ensemble_mean_tuned": dict(ensemble_size=4, batch_size=3, output_uncertainty=True, ensembling_kwargs=dict(
        reduction="mean", regularizer_strength=0.1, max_iter=5, tol=1e-6, max_res=16)),
    "native_resolution": dict(processing_resolution=0, match_input_resolution=False, num_inference_steps=3),
    "custom_resolution": dict(processing_resolution=16, resample_method_input="bicubic",
                              resample_method_output="nearest", ensemble_size=3, output_uncertainty=True),
    "torch_output": dict(output_type="pt", ensemble_size=3, output_uncertainty=True, batch_size=2),
    "no_return_dict": dict(ensemble_size=3, output_uncertainty=True, return_dict=False),
}


@pytest.mark.parametrize("kwargs", CALLS.values(), ids=CALLS.keys())
def test_calls_match_diffusers(pipes, kwargs):
    ref, ours = pipes
    assert_same(ref(image(), generator=seeded(0), **kwargs), ours(image(), generator=seeded(0), **kwargs))


def _inputs():
    pil = [image(seed=s) for s in range(3)]
    arrays = [np.asarray(p) for p in pil]
    return {
        "pil_list": (pil[:2], dict(ensemble_size=2, batch_size=3)),
        "numpy_uint8_batch": (np.stack(arrays), dict(batch_size=2)),
        "numpy_float_gray": (arrays[0][..., 0].astype(np.float64) / 255, dict()),
        "numpy_uint16": ((arrays[1].astype(np.uint16) * 257), dict()),
        "torch_float_chw": (torch.tensor(arrays[2]).permute(2, 0, 1) / 255.0, dict(ensemble_size=3)),
        "torch_uint8_list": ([torch.tensor(a).permute(2, 0, 1) for a in arrays], dict(ensemble_size=2,
                                                                                          batch_size=4)),
    }


@pytest.mark.parametrize("inputs,kwargs", _inputs().values(), ids=_inputs().keys())
def test_input_kinds_match_diffusers(pipes, inputs, kwargs):
    ref, ours = pipes
    assert_same(ref(inputs, generator=seeded(1), **kwargs), ours(inputs, generator=seeded(1), **kwargs))


def test_generator_lists_and_given_latents_match_diffusers(pipes):
    ref, ours = pipes
    pair = [image(seed=0), image(seed=1)]
    kwargs = dict(ensemble_size=3, batch_size=4, output_latent=True, output_uncertainty=True)
    expected = ref(pair, generator=seeded(5, 6), **kwargs)
    assert_same(expected, ours(pair, generator=seeded(5, 6), **kwargs))
    again = dict(kwargs, batch_size=2)
    assert_same(ref(pair, latents=expected.latent, **again), ours(pair, latents=expected.latent, **again))


@pytest.mark.parametrize("generator_count", [None, 3], ids=["one_generator", "generator_list"])
def test_lcm_scheduler_matches_diffusers(folder, generator_count):
    # LCM injects fresh noise between its steps, drawn from the generator(s) for each batch of members.
    ref = diffusers.MarigoldDepthPipeline.from_pretrained(folder)
    ours = MarigoldDepthPipeline.from_pretrained(folder)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ours.scheduler = LCMScheduler.from_config(ours.scheduler.config)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, ensemble_size=3, batch_size=2, output_uncertainty=True)
    assert_same(ref(image(), generator=seeded(2, generator_count), **kwargs),
                ours(image(), generator=seeded(2, generator_count), **kwargs))


def test_float16_matches_diffusers(folder):
    ref = diffusers.MarigoldDepthPipeline.from_pretrained(folder, dtype=torch.float16)
    ours = MarigoldDepthPipeline.from_pretrained(folder, torch_dtype=torch.float16)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    # processing_resolution=0: torch has no anti-aliased float16 resize on the CPU (diffusers fails there too).
    kwargs = dict(ensemble_size=3, output_uncertainty=True, output_type="pt", output_latent=True,
                  processing_resolution=0)
    expected = ref(image(), generator=seeded(3), **kwargs)
    got = ours(image(), generator=seeded(3), **kwargs)
    assert got.prediction.dtype == got.latent.dtype == torch.float16
    assert_same(expected, got)


def test_hooks_fire_for_every_step_of_every_batch(pipes):
    _, ours = pipes
    seen = []

    class Recorder:
        @hookimpl
        def on_step_end(self, pipe, call, step):
            seen.append(step.latents.shape[0])

    ours(image(), generator=seeded(0), num_inference_steps=2, ensemble_size=3, batch_size=2, hooks=[Recorder()])
    assert seen == [2, 2, 1, 1]


ENSEMBLING = {
    "affine_median": (dict(), 1.0),
    "affine_mean_uncertainty": (dict(reduction="mean", output_uncertainty=True, max_iter=6, tol=1e-8), 1.0),
    "median_uncertainty_no_regularizer": (dict(output_uncertainty=True, regularizer_strength=0.0, max_iter=4), 1.0),
    "scale_only": (dict(shift_invariant=False, output_uncertainty=True, max_iter=4), 400.0),
    "max_res": (dict(max_res=7, output_uncertainty=True, max_iter=3), 1.0),
}


@pytest.mark.parametrize("kwargs,magnitude", ENSEMBLING.values(), ids=ENSEMBLING.keys())
def test_ensembling_matches_diffusers(kwargs, magnitude):
    # BFGS differentiates numerically with steps of about 1e-8 of each parameter, which float32 maps resolve
    # only for parameters near 0: a shift of 0 (members that reach 0) or a small scale (members far from 0).
    # Elsewhere the solver stops at its start, which the pipeline tests cover.
    generator = torch.Generator().manual_seed(7)
    base = torch.rand(1, 1, 12, 20, generator=generator)
    depth = (base * torch.tensor([0.6, 0.9, 0.75, 1.2]).view(-1, 1, 1, 1)
             + 0.05 * torch.rand(4, 1, 12, 20, generator=generator))
    depth[:, :, 0, 0] = 0.0
    depth = depth * magnitude
    expected = diffusers.MarigoldDepthPipeline.ensemble_depth(depth, **kwargs)
    got = MarigoldDepthPipeline.ensemble_depth(depth, **kwargs)
    for e, g in zip(expected, got):
        assert (e is None) == (g is None)
        if e is not None:
            assert torch.equal(e, g)


def test_pictures_match_diffusers():
    generator = torch.Generator().manual_seed(4)
    depth = torch.rand(2, 1, 6, 9, generator=generator)
    as_numpy = depth.permute(0, 2, 3, 1).numpy()
    for args in [(depth,), (as_numpy, 0.2, 0.8, "binary"), ([as_numpy[0, ..., 0], depth[1, 0]], 0.0, 1.0,
                                                            "Spectral_r")]:
        for e, g in zip(RefImageProcessor.visualize_depth(*args), MarigoldImageProcessor.visualize_depth(*args)):
            assert np.array_equal(np.asarray(e), np.asarray(g))
    pngs = MarigoldImageProcessor.export_depth_to_16bit_png(as_numpy, 0.1, 0.9)
    assert pngs[0].mode == "I;16"
    expected = ((as_numpy[1, ..., 0] - 0.1) / 0.8 * 65535).astype(np.uint16)
    np.testing.assert_array_equal(np.asarray(pngs[1]), expected)
    # diffusers' own export fails on this Pillow (fromarray(uint16, mode='I;16') is refused); both read ours back
    for e, g in zip(RefImageProcessor.visualize_depth(pngs), MarigoldImageProcessor.visualize_depth(pngs)):
        assert np.array_equal(np.asarray(e), np.asarray(g))
    spread = torch.rand(2, 1, 6, 9, generator=generator)
    expected = RefImageProcessor.visualize_uncertainty(spread)
    for e, g in zip(expected, MarigoldImageProcessor.visualize_uncertainty(spread)):
        assert np.array_equal(np.asarray(e), np.asarray(g))


ERRORS = {
    "zero_steps": (image(), dict(num_inference_steps=0)),
    "zero_ensemble": (image(), dict(ensemble_size=0)),
    "uncertainty_without_ensemble": (image(), dict(output_uncertainty=True)),
    "negative_resolution": (image(), dict(processing_resolution=-8)),
    "resolution_not_multiple": (image(), dict(processing_resolution=20)),
    "resample_method": (image(), dict(resample_method_input="lanczos")),
    "zero_batch": (image(), dict(batch_size=0)),
    "output_type": (image(), dict(output_type="pil")),
    "latents_and_generator": (image(), dict(latents=torch.zeros(1, 4, 3, 4), generator=seeded(0))),
    "latents_shape": (image(), dict(latents=torch.zeros(1, 4, 4, 4))),
    "ensembling_kwargs_type": (image(), dict(ensemble_size=3, ensembling_kwargs=[("reduction", "mean")])),
    "reduction": (image(), dict(ensemble_size=3, ensembling_kwargs=dict(reduction="max"))),
    "generator_count": (image(), dict(ensemble_size=3, generator=seeded(0, 2))),
    "sizes_differ": ([image(), image(32, 45)], dict()),
    "out_of_range": (np.full((8, 8, 3), 1.5, dtype=np.float32), dict()),
    "signed_ints": (np.zeros((8, 8, 3), dtype=np.int32), dict()),
    "four_channels": (PIL.Image.new("RGBA", (8, 8)), dict()),
    "five_dims": (np.zeros((1, 1, 8, 8, 3)), dict()),
    "not_an_image": ("photo.png", dict()),
}


@pytest.mark.parametrize("inputs,kwargs", ERRORS.values(), ids=ERRORS.keys())
def test_errors_where_diffusers_raises(pipes, inputs, kwargs, caplog):
    ref, ours = pipes
    caplog.set_level(logging.ERROR)
    with pytest.raises(Exception) as expected:
        ref(inputs, **kwargs)
    with pytest.raises(expected.type):
        ours(inputs, **kwargs)
