"""Callbacks and hooks on Stable Diffusion against diffusers: edited latents, the official cutoff callbacks,
MultiPipelineCallbacks, and guidance rules supplied by a hook."""

import diffusers
import diffusers.callbacks
import numpy as np
import pytest
import torch

import tiny
from diffloom import (MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback, StableDiffusionPipeline,
                      hookimpl)

PROMPT = "a photo of the red cat"
H, W = tiny.IMAGE_HEIGHT, tiny.IMAGE_WIDTH


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def run(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "height": H, "width": W, "output_type": "np",
              "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(prompt, **kwargs).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_latents_edited_in_a_callback(sd):
    def damp(pipe, i, t, kwargs):
        if i == 1:
            kwargs["latents"] = kwargs["latents"] * 0.5
        return kwargs

    ours, ref = (run(p, callback_on_step_end=damp) for p in sd)
    assert max_diff(ours, ref) <= 1e-4
    assert max_diff(ours, run(sd[0])) > 1e-3


@pytest.mark.parametrize("cutoff", [dict(cutoff_step_ratio=0.5), dict(cutoff_step_ratio=None, cutoff_step_index=1)])
def test_official_cfg_cutoff_matches_diffusers(sd, cutoff):
    ours = run(sd[0], callback_on_step_end=SDCFGCutoffCallback(**cutoff))
    ref = run(sd[1], callback_on_step_end=diffusers.callbacks.SDCFGCutoffCallback(**cutoff))
    assert max_diff(ours, ref) <= 1e-4


def test_cfg_cutoff_works_for_any_batch(sd):
    """diffusers keeps only the last row of the CFG batch (right for one image only); we keep the whole
    conditional half, so a batch of two equals the dynamic-CFG recipe written with chunk(2)."""

    def recipe(pipe, i, t, kwargs):
        if i == 2:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs

    prompts = [PROMPT, "a green square"]
    ours = run(sd[0], prompts, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2))
    by_hand = run(sd[1], prompts, callback_on_step_end=recipe, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert ours.shape[0] == 2 and max_diff(ours, by_hand) <= 1e-4


def test_multi_pipeline_callbacks_match_diffusers(sd):
    def damp(pipe, i, t, kwargs):
        if i == 0:
            kwargs["latents"] = kwargs["latents"] * 0.9
        return kwargs

    class Damp(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return damp(pipeline, step_index, timestep, callback_kwargs)

    class RefDamp(diffusers.callbacks.PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return damp(pipeline, step_index, timestep, callback_kwargs)

    ours = run(sd[0], callback_on_step_end=MultiPipelineCallbacks([Damp(), SDCFGCutoffCallback(cutoff_step_ratio=0.5)]))
    ref = run(sd[1], callback_on_step_end=diffusers.callbacks.MultiPipelineCallbacks(
        [RefDamp(), diffusers.callbacks.SDCFGCutoffCallback(cutoff_step_ratio=0.5)]))
    assert max_diff(ours, ref) <= 1e-4


def test_pipeline_callback_arguments_are_checked():
    with pytest.raises(ValueError, match="exactly one of"):
        SDCFGCutoffCallback(cutoff_step_ratio=0.5, cutoff_step_index=2)
    with pytest.raises(ValueError, match="exactly one of"):
        SDCFGCutoffCallback(cutoff_step_ratio=None)
    with pytest.raises(ValueError, match=r"float in \[0.0, 1.0\]"):
        SDCFGCutoffCallback(cutoff_step_ratio=1.5)


def test_a_hook_can_supply_another_guidance_rule(sd):
    """A hook replacing the noise prediction with CFG at scale 3 equals the pipeline run at guidance 3."""

    class Guidance3:
        @hookimpl
        def after_denoiser(self, pipe, call, step):
            uncond, text = step.model_output.chunk(2)
            step.noise_pred = uncond + 3.0 * (text - uncond)

    hooked = run(sd[0], guidance_scale=7.5, hooks=[Guidance3()])
    assert max_diff(hooked, run(sd[1], guidance_scale=3.0)) <= 1e-4
    assert max_diff(hooked, run(sd[0], guidance_scale=7.5)) > 1e-3


def test_a_hook_can_change_the_conditioning(sd):
    """Swapping the text embeddings before the denoiser equals prompting with the other text."""
    other = sd[0].encode_prompt("a green square", "cpu", 1, True)

    class Swap:
        @hookimpl
        def before_denoiser(self, pipe, call, step):
            step.conditioning["encoder_hidden_states"] = torch.cat([other[1], other[0]])

    assert max_diff(run(sd[0], hooks=[Swap()]), run(sd[1], "a green square")) <= 1e-4
