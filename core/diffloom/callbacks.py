"""diffusers' step-end callback classes, and the official cutoff callbacks.

A callback is called after each step as ``callback(pipe, step_index, timestep, callback_kwargs)`` and returns
``callback_kwargs``; the tensors it returns replace the pipeline's for the next step. ``tensor_inputs`` names
the tensors it needs (checked against the pipeline's ``_callback_tensor_inputs``). The older
``callback=``/``callback_steps=`` arguments are delivered by :class:`StepCallback`.
"""

from __future__ import annotations

import warnings

from .configuration import ConfigMixin, register_to_config
from .hookspecs import hookimpl


class PipelineCallback(ConfigMixin):
    """A callback that acts once, at a cutoff step given as a ratio of the steps or as an index."""

    config_name = "config.json"  # what diffusers writes and reads for a callback
    tensor_inputs: list[str] = []

    @register_to_config
    def __init__(self, cutoff_step_ratio=1.0, cutoff_step_index=None):
        if (cutoff_step_ratio is None) == (cutoff_step_index is None):
            raise ValueError("give exactly one of cutoff_step_ratio and cutoff_step_index "
                             "(set cutoff_step_ratio=None to use cutoff_step_index)")
        if cutoff_step_ratio is not None and (
                not isinstance(cutoff_step_ratio, float) or not 0.0 <= cutoff_step_ratio <= 1.0):
            raise ValueError(f"cutoff_step_ratio must be a float in [0.0, 1.0], got {cutoff_step_ratio!r}")

    def cutoff_step(self, pipeline) -> int:
        if self.config.cutoff_step_index is not None:
            return self.config.cutoff_step_index
        return int(pipeline.num_timesteps * self.config.cutoff_step_ratio)

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must define callback_fn")

    def __call__(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)


class MultiPipelineCallbacks:
    """Several callbacks run in order; each sees what the previous returned."""

    def __init__(self, callbacks):
        self.callbacks = list(callbacks)

    @property
    def tensor_inputs(self) -> list[str]:
        names = []
        for callback in self.callbacks:
            names += [n for n in callback.tensor_inputs if n not in names]
        return names

    def __call__(self, pipeline, step_index, timestep, callback_kwargs) -> dict:
        for callback in self.callbacks:
            callback_kwargs = callback(pipeline, step_index, timestep, callback_kwargs)
        return callback_kwargs


class _CFGCutoff(PipelineCallback):
    """At the cutoff step, keep only the conditional half of each CFG-batched tensor and stop guidance.

    CFG tensors are stacked as [unconditional batch, conditional batch]; taking the second half works for
    any batch size (diffusers keeps only the last row, which is right for a batch of one only).
    """

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.cutoff_step(pipeline):
            for name in self.tensor_inputs:
                tensor = callback_kwargs[name]
                callback_kwargs[name] = tensor[tensor.shape[0] // 2:]
            pipeline._guidance_scale = 0.0
        return callback_kwargs


class SDCFGCutoffCallback(_CFGCutoff):
    tensor_inputs = ["prompt_embeds"]


class SDXLCFGCutoffCallback(_CFGCutoff):
    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]


class SDXLControlnetCFGCutoffCallback(_CFGCutoff):
    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids", "image"]


class IPAdapterScaleCutoffCallback(PipelineCallback):
    """Turn the IP-Adapter off (scale 0) from the cutoff step on."""

    tensor_inputs: list[str] = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        if step_index == self.cutoff_step(pipeline):
            pipeline.set_ip_adapter_scale(0.0)
        return callback_kwargs


class StepCallback:
    """The older diffusers protocol: ``callback(step, timestep, latents)`` every ``callback_steps`` steps.

    diffusers calls it where its progress bar advances (solver steps, not model calls), on the latents after
    ``callback_on_step_end``; its return value is ignored. The pipeline keeps its ``num_warmup_steps`` in the
    call's settings, since the bar only starts counting after the warm-up steps.
    """

    def __init__(self, callback, callback_steps: int):
        self.callback = callback
        self.callback_steps = callback_steps

    @hookimpl(wrapper=True)
    def on_step_end(self, pipe, call, step):
        results = yield  # every other step-end hook, callback_on_step_end included, runs first
        order = getattr(pipe.scheduler, "order", 1)
        i = step.index
        ticks = i == call.num_timesteps - 1 or (
            i + 1 > call.settings.get("num_warmup_steps", 0) and (i + 1) % order == 0)
        if ticks and i % self.callback_steps == 0:
            self.callback(i // order, step.timestep, step.latents)
        return results


def step_callback_hooks(callback, callback_steps) -> list:
    """The hook list that delivers an upscaler's ``callback=``/``callback_steps=`` arguments."""
    if isinstance(callback_steps, bool) or not isinstance(callback_steps, int) or callback_steps <= 0:
        raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
    return [] if callback is None else [StepCallback(callback, callback_steps)]


def deprecated_step_callback_hooks(callback, callback_steps) -> list:
    """``callback=``/``callback_steps=`` on the pipelines where diffusers still takes them but warns that they are
    going away (Stable Diffusion, SDXL, ControlNet, depth-to-image)."""
    if callback is None and callback_steps is None:
        return []
    warnings.warn("callback and callback_steps are deprecated, as in diffusers: pass callback_on_step_end "
                  "instead", FutureWarning, stacklevel=3)
    return step_callback_hooks(callback, 1 if callback_steps is None else callback_steps)
