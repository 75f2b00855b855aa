"""Denoiser steps replayed from CUDA graphs.

At batch 1 a Stable Diffusion step launches about a thousand kernels, and the host, not the GPU, sets the
pace: eager PyTorch spends tens of microseconds of Python per kernel. A CUDA graph records the kernels once
and launches them all with one call.

:class:`CudaGraphSteps` is a ``run_step`` hook. Each step it runs the pipeline's ``prepare_model_input``
eagerly, copies the model input, timestep and conditioning into the static tensors of a recording, replays
the recorded ``run_denoiser`` + ``guide``, and finishes with the pipeline's eager ``scheduler_step``.
One recording serves every step of every call with inputs of the same shapes: the timestep is an input, not
a constant. The scheduler step stays eager on purpose: it is a few elementwise kernels that the host queues
while the GPU is still replaying the previous graph, so recording it would save nothing, and eager it keeps
every scheduler exact, stochastic ones included (their noise comes from the caller's generator).

A recording bakes in what was a Python value when it was captured: shapes, dtypes, the guidance scale, the
attention processors and their settings. The signature of a step covers all of those, so a step that differs
gets a recording of its own (at most ``max_recordings`` are kept, least recently used dropped first), and
the step runs eagerly whenever replaying could be wrong: a pipeline whose denoiser reads more than its step
inputs (no ``denoiser_components``), ``before_denoiser``/``after_denoiser`` hooks, torch hooks on a denoiser
model (an unfused LoRA), offloading, or tensors off the GPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from diffloom import hookimpl
from diffloom.loop import StepState

_PRIMITIVES = (int, float, bool, str, type(None))


def _is_primitive(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_primitive(v) for v in value)
    return isinstance(value, _PRIMITIVES) or isinstance(value, torch.dtype)


def _frozen(value):
    """A primitive value as a dictionary key can hold it: lists become tuples."""
    return tuple(map(_frozen, value)) if isinstance(value, (list, tuple)) else value


def _split(value, tensors: list, layout: list, path: str = "") -> bool:
    """Walk a nest of dicts, lists and tuples: tensors go to ``tensors``, everything else (and each tensor's
    shape, dtype and device) to ``layout``. False when a leaf is neither a tensor nor a primitive value."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        layout.append((path, "tensor", tuple(value.shape), value.dtype, value.device))
        return True
    if isinstance(value, dict):
        layout.append((path, "dict", tuple(map(repr, value))))
        return all(_split(v, tensors, layout, f"{path}.{k}") for k, v in value.items())
    if isinstance(value, (list, tuple)) and not _is_primitive(value):
        layout.append((path, type(value).__name__, len(value)))
        return all(_split(v, tensors, layout, f"{path}[{i}]") for i, v in enumerate(value))
    if not _is_primitive(value):
        return False
    layout.append((path, _frozen(value)))
    return True


def _rebuild(value, static: list):
    """``value`` with its tensors replaced, in walk order, by those of ``static`` (consumed from the front)."""
    if isinstance(value, torch.Tensor):
        return static.pop(0)
    if isinstance(value, dict):
        return {k: _rebuild(v, static) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not _is_primitive(value):
        return type(value)(_rebuild(v, static) for v in value)
    return value


def _models_state(pipe):
    """What a recording bakes in from the denoiser's models: which modules and attention processors run, with
    the processors' settings (an IP-Adapter's scale). None when a model carries torch hooks, whose Python would
    run at capture time only."""
    state = []
    for name in pipe.denoiser_components:
        component = getattr(pipe, name)
        state.append((name, id(component)))
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            if module._forward_hooks or module._forward_pre_hooks:
                return None
            # A processor with weights (an IP-Adapter's) is a submodule, kept in _modules rather than __dict__.
            processor = module.__dict__.get("processor") or module._modules.get("processor")
            if processor is not None:
                settings = tuple((k, _frozen(v)) for k, v in vars(processor).items() if _is_primitive(v))
                state.append((id(module), id(processor), settings))
    return tuple(state)


class _Recording:
    """One captured denoiser + guidance: its graph, the static tensors it reads and the one it writes."""

    def __init__(self, graph, inputs: list, output: torch.Tensor):
        self.graph = graph
        self.inputs = inputs
        self.output = output


class CudaGraphSteps:
    """A ``run_step`` hook that replays each step's denoiser and guidance from a CUDA graph.

    ``warmup`` eager runs precede each capture (on a side stream, as CUDA graphs require): they initialise
    cuBLAS and cuDNN, and trigger ``torch.compile`` when the model is compiled.
    """

    def __init__(self, warmup: int = 2, max_recordings: int = 4, compiler=None):
        if warmup < 1:
            raise ValueError(f"warmup={warmup}: at least one eager run must precede a CUDA graph capture")
        if max_recordings < 1:
            raise ValueError(f"max_recordings={max_recordings} must be at least 1")
        self.warmup = warmup
        self.max_recordings = max_recordings
        self.captures = 0
        self.replays = 0
        self._recordings: OrderedDict = OrderedDict()  # signature -> [idle _Recording]
        self._lock = threading.Lock()
        # A BackgroundCompiler whose models the denoiser runs: its generation is part of every signature.
        self.compiler = compiler
        self._generation = 0

    def clear(self):
        """Drop every recording and free its GPU memory pool."""
        with self._lock:
            self._recordings.clear()

    @hookimpl
    def run_step(self, pipe, call, step):
        if not getattr(pipe, "denoiser_components", ()) or pipe.__dict__.get("_execution_device") is not None:
            return None
        if call.hook.before_denoiser.get_hookimpls() or call.hook.after_denoiser.get_hookimpls():
            return None
        if not (isinstance(step.latents, torch.Tensor) and step.latents.is_cuda):
            return None
        models = _models_state(pipe)
        if models is None:
            return None
        pipe.prepare_model_input(call, step)
        tensors, layout = [], []
        inputs = {"model_input": step.model_input, "model_timestep": step.model_timestep,
                  "conditioning": step.conditioning}
        if not _split(inputs, tensors, layout) or not all(t.is_cuda for t in tensors):
            return self._eager_rest(pipe, call, step)
        settings = tuple((k, _frozen(v)) for k, v in sorted(call.settings.items()) if _is_primitive(v))
        generation = self.compiler.generation if self.compiler is not None else 0
        if generation != self._generation:
            # The models switched to compiled code: recordings over the eager kernels are stale.
            with self._lock:
                self._recordings.clear()
                self._generation = generation
        signature = (id(pipe), models, tuple(layout), call.guidance_scale, settings, generation)
        recording = self._checkout(signature)
        if recording is None:
            recording = self._capture_unless_compiling(pipe, call, step, inputs, tensors)
            if recording is None:
                return self._eager_rest(pipe, call, step)
        try:
            for static, value in zip(recording.inputs, tensors):
                static.copy_(value)
            recording.graph.replay()
            # The output buffer is overwritten by the next replay, and the scheduler may keep what it is given.
            step.noise_pred = recording.output.clone()
            with self._lock:
                self.replays += 1
        finally:
            self._checkin(signature, recording)
        return pipe.scheduler_step(call, step)

    @staticmethod
    def _eager_rest(pipe, call, step):
        # The model input is prepared (prepare_model_input may advance scheduler state): finish from there.
        step.model_output = pipe.run_denoiser(call, step)
        step.noise_pred = pipe.guide(call, step)
        return pipe.scheduler_step(call, step)

    def _checkout(self, signature):
        with self._lock:
            idle = self._recordings.get(signature)
            if idle is None:
                return None
            self._recordings.move_to_end(signature)
            return idle.pop() if idle else None

    def _checkin(self, signature, recording):
        with self._lock:
            if signature[-1] != self._generation:
                return
            self._recordings.setdefault(signature, []).append(recording)
            self._recordings.move_to_end(signature)
            while len(self._recordings) > self.max_recordings:
                self._recordings.popitem(last=False)

    def _capture_unless_compiling(self, pipe, call, step, inputs, tensors) -> _Recording | None:
        if self.compiler is None:
            return self._capture(pipe, call, step, inputs, tensors)
        # A capture must not overlap the compiler's GPU work (it synchronises the device while tuning kernels).
        with self.compiler.capture_lock:
            if self.compiler.busy:
                return None
            return self._capture(pipe, call, step, inputs, tensors)

    def _capture(self, pipe, call, step, inputs, tensors) -> _Recording:
        static = [t.clone() for t in tensors]
        static_inputs = _rebuild(inputs, list(static))
        static_step = StepState(index=step.index, timestep=step.timestep, latents=step.latents,
                                model_input=static_inputs["model_input"],
                                model_timestep=static_inputs["model_timestep"],
                                conditioning=static_inputs["conditioning"])

        def body():
            static_step.model_output = pipe.run_denoiser(call, static_step)
            return pipe.guide(call, static_step)

        side = torch.cuda.Stream(device=step.latents.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may keep launching work while this one captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = body()
        static_step.model_output = None
        with self._lock:
            self.captures += 1
        return _Recording(graph, static, output)
