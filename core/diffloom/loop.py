"""Per-call state and the hook points of the denoising loop.

Every pipeline call runs inside a :class:`CallState`. It holds what diffusers keeps on the pipeline object
(guidance scale, interrupt flag, number of timesteps, the scheduler's step state) so that one pipeline can serve
several threads at once: ``pipe._guidance_scale`` and friends read and write the call running in the current
thread (a context variable), not a field shared by all threads.

Hooks come from three places, fired in pluggy's order (tryfirst/trylast honoured): installed plugins, objects
attached to the pipeline (``pipe.hooks.append(obj)``) and objects given for one call (``hooks=[...]``). The
diffusers ``callback_on_step_end`` is delivered as one more step-end implementation, after all the others.
"""

from __future__ import annotations

import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .hookspecs import hookimpl

logger = logging.getLogger("diffloom.hooks")

_current: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("diffloom_call", default=None)

# The hooks fired once per step; the others fire once per call.
LOOP_HOOKS = ("on_call_start", "on_step_begin", "run_step", "before_denoiser", "after_denoiser",
              "on_step_end", "after_decode", "on_call_end")


def current_call() -> CallState | None:
    """The pipeline call running in this thread (or asyncio task), if any."""
    return _current.get()


@dataclass
class StepState:
    """One denoising step, as the hooks see it."""

    index: int
    timestep: Any
    latents: Any
    model_input: Any = None
    model_timestep: Any = None
    conditioning: dict = field(default_factory=dict)
    model_output: Any = None
    noise_pred: Any = None


class CallState:
    """The state of one pipeline call.

    ``tensors`` holds the named tensors a ``callback_on_step_end`` may read and replace (``latents``,
    ``prompt_embeds``...): pipelines read them from here each step, so a replacement takes effect.
    ``components`` holds per-call replacements of pipeline components (the call's own scheduler copy).
    ``settings`` holds the keyword arguments given to ``start_call`` (also readable as attributes) and any
    other per-call values a pipeline keeps while it runs (``call.settings["image_latents"] = ...``).
    """

    def __init__(self, pipe, *, guidance_scale=1.0, hooks=(), callback=None, callback_tensor_inputs=None,
                 **settings):
        self.pipe = pipe
        self.guidance_scale = guidance_scale
        self.interrupt = False
        self.num_timesteps = 0
        self.tensors: dict[str, Any] = {}
        self.components: dict[str, Any] = {}
        self.settings = settings
        for name, value in settings.items():
            setattr(self, name, value)
        self._hook_objects = [*installed_hook_plugins(), *getattr(pipe, "hooks", ()), *hooks]
        if callback is not None:
            self._hook_objects.append(DiffusersCallback(callback, callback_tensor_inputs, pipe))
        self._pm = _plugin_manager(self._hook_objects)
        self.hook = self._pm.hook
        self._token = None

    def __enter__(self):
        self._token = _current.set(self)
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        # After the call only its scalar state stays readable (pipe.num_timesteps...): drop the tensors,
        # the scheduler copy and the hook objects so they do not live until the next call.
        self.tensors, self.components, self.settings = {}, {}, {}
        self._hook_objects, self._pm, self.hook = [], None, None
        self.pipe._remember_call(self)
        return False

    def fire_after_decode(self, images):
        for replacement in self.hook.after_decode(pipe=self.pipe, call=self, images=images):
            if replacement is not None:
                images = replacement
        return images


def _plugin_manager(objects) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("diffloom")
    pm.add_hookspecs(hookspecs)
    for obj in objects:
        if pm.is_registered(obj):
            continue
        pm.register(obj)
    if os.environ.get("DIFFLOOM_TRACE_HOOKS", "") not in ("", "0"):
        pm.add_hookcall_monitoring(
            lambda name, impls, kwargs: logger.warning(
                "hook %s -> %s (step %s)", name, [i.plugin_name for i in impls],
                getattr(kwargs.get("step"), "index", "-")),
            lambda outcome, name, impls, kwargs: None)
    return pm


def installed_hook_plugins() -> list:
    """Installed plugins that implement at least one loop hook."""
    from .registry import registry

    registry.ensure_loaded()
    plugins = []
    for name in LOOP_HOOKS:
        for impl in getattr(registry.pm.hook, name).get_hookimpls():
            if impl.plugin not in plugins:
                plugins.append(impl.plugin)
    return plugins


class CallbackError(RuntimeError):
    """A ``callback_on_step_end`` that failed or returned something unusable."""


class DiffusersCallback:
    """Delivers a diffusers-style ``callback_on_step_end`` as a step-end hook."""

    def __init__(self, callback, tensor_inputs, pipe):
        from .callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = list(callback.tensor_inputs)
        tensor_inputs = list(tensor_inputs) if tensor_inputs is not None else ["latents"]
        allowed = list(getattr(pipe, "_callback_tensor_inputs", ["latents"]))
        unknown = [name for name in tensor_inputs if name not in allowed]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs names {unknown}, which {type(pipe).__name__} "
                             f"does not provide; allowed: {allowed}")
        self.callback = callback
        self.tensor_inputs = tensor_inputs
        self.name = getattr(callback, "__qualname__", None) or type(callback).__name__

    @hookimpl(trylast=True)
    def on_step_end(self, pipe, call, step):
        call.tensors["latents"] = step.latents
        kwargs = {name: call.tensors.get(name) for name in self.tensor_inputs}
        try:
            result = self.callback(pipe, step.index, step.timestep, kwargs)
        except CallbackError:
            raise
        except Exception as e:
            raise CallbackError(f"callback_on_step_end {self.name} raised at step {step.index}: "
                                f"{type(e).__name__}: {e}") from e
        if not isinstance(result, dict):
            raise CallbackError(f"callback_on_step_end {self.name} returned {type(result).__name__} at step "
                                f"{step.index}; it must return the callback_kwargs dict")
        # A tensor the callback leaves out keeps its value, as in diffusers (callbacks often return only what
        # they changed).
        call.tensors.update(result)
        step.latents = call.tensors["latents"]
