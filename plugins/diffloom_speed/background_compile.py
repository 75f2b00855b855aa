"""``torch.compile`` on a worker thread, so that the fast path's first call does not wait for the compiler.

Inductor takes 70 to 90 s to compile an SD 1.5 UNet and 30 s more for the VAE decoder. Waiting for that before
the first image is what makes compiled pipelines painful to start. Here a model keeps running eagerly (inside the
quick mode's CUDA graphs, which record in about a second) while a worker thread compiles it; when every waiting
model has compiled, they switch to their compiled code together and :attr:`BackgroundCompiler.generation`
advances, which tells the step graphs to record again, now over the compiled kernels.

A model is compiled for the inputs it has met: :class:`_CompiledLater` keeps a copy of the first inputs of each
kind (shapes, strides, dtypes: what the compiled code's guards check), runs calls with inputs of a new kind
eagerly, and the worker calls the compiled model once with each copy, on a stream of its own, under the grad mode
of the call. So a new image size or batch size is compiled in the background too, never under a caller.
Work starts when a pipeline call ends (``on_call_end``), after the step graphs have recorded. A CUDA graph
capture must not overlap the compiler's own GPU work (it synchronises while it tunes kernels): the worker starts
only between captures (``capture_lock``), and while it runs the step graphs record nothing new.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from diffloom import hookimpl


# Dynamo compiles one function for at most 8 kinds of input (its recompile limit) and runs the rest eagerly:
# inputs of further kinds are not kept either.
MAX_SIGNATURES = 8


def _same_layout_copy(value):
    """A copy of ``value``'s tensors with their exact strides: the compiled code guards on them."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    return copy.copy_(value)


def _signature(args, kwargs):
    """What the compiled code specialises on: grad and inference mode, the nesting, each tensor's shape, strides,
    dtype and device, and every other value (or, for objects that are not plain values, their type)."""
    leaves, spec = tree_flatten((args, kwargs))
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), str(spec), tuple(
        (tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor)
        else leaf if isinstance(leaf, (int, float, bool, str, type(None), torch.dtype)) else type(leaf)
        for leaf in leaves)


class _CompiledLater:
    """Installed as a module's ``_compiled_call_impl`` (what ``nn.Module.__call__`` runs when set): calls with
    inputs the compiled code serves run it; others run eagerly, and the first of each kind leaves a copy of its
    inputs for the worker to compile for."""

    def __init__(self, module: torch.nn.Module, compile_fn, lock: threading.Lock):
        self.module = module
        self.compiled = compile_fn(module._call_impl)
        self.ready: set = set()  # signatures the compiled code serves
        self.pending: dict = {}  # signature -> a copy of inputs of that signature, to compile for
        self._lock = lock

    def __call__(self, *args, **kwargs):
        signature = _signature(args, kwargs)
        if signature in self.ready:
            return self.compiled(*args, **kwargs)
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        room = len(self.ready) + len(self.pending) < MAX_SIGNATURES
        if signature not in self.pending and room and not capturing:
            example = tree_map(_same_layout_copy, (args, kwargs))
            with self._lock:
                self.pending.setdefault(signature, example)
        return self.module._call_impl(*args, **kwargs)

    def warm_up(self, signature, example):
        """Compile by calling the compiled module once with ``example`` (on the calling thread)."""
        grad, inference = signature[:2]
        args, kwargs = example
        device = next((t.device for t in tree_leaves(example) if isinstance(t, torch.Tensor)), None)
        side = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        # inference_mode(False) would switch grad mode on, so it is entered only when set, and grad mode after it.
        with torch.inference_mode() if inference else contextlib.nullcontext(), torch.set_grad_enabled(grad):
            if side is None:
                self.compiled(*args, **kwargs)
                return
            with torch.cuda.stream(side):
                self.compiled(*args, **kwargs)
            side.synchronize()


class BackgroundCompiler:
    """Compiles the given models on a worker thread for the inputs they have run with eagerly; a hook
    (``on_call_end``) that starts the worker after a pipeline call. ``compile_fn`` turns a callable into its
    compiled form."""

    def __init__(self, modules, compile_fn):
        self._lock = threading.Lock()
        self._waiting = [_CompiledLater(module, compile_fn, self._lock) for module in modules]
        for later in self._waiting:
            later.module._compiled_call_impl = later
        self.generation = 0
        self.error: BaseException | None = None
        self._worker: threading.Thread | None = None
        # Held by CUDA graph captures; the worker starts only between them, and none starts while it runs.
        self.capture_lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def compiled(self) -> bool:
        """True once every model has compiled code and none waits to be compiled for new inputs."""
        return bool(self._waiting) and all(later.ready and not later.pending for later in self._waiting)

    @hookimpl
    def on_call_end(self, pipe, call, output):
        self.start()

    def start(self):
        """Compile, on a worker thread, for every input signature the models have met eagerly."""
        with self.capture_lock, self._lock:
            if self.busy or self.error is not None:
                return
            work = [(later, signature, example) for later in self._waiting
                    for signature, example in later.pending.items()]
            if not work:
                return
            self._worker = threading.Thread(target=self._compile, args=(work,), name="diffloom-compile",
                                            daemon=True)
            self._worker.start()

    def _compile(self, work):
        try:
            for later, signature, example in work:
                later.warm_up(signature, example)
        except BaseException as error:  # kept for wait(); the models stay eager meanwhile
            self.error = error
            return
        with self._lock:
            for later, signature, _ in work:
                later.ready.add(signature)
                del later.pending[signature]
            self.generation += 1

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker (at most ``timeout`` seconds); re-raise what it raised. True once every model
        runs its compiled code."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        if self.error is not None:
            raise RuntimeError(f"compiling in the background failed ({type(self.error).__name__}: {self.error}); "
                               f"the models keep running eagerly") from self.error
        return self.compiled

    def detach(self):
        """Put the models back to plain eager; a worker still running finishes for nothing."""
        for later in self._waiting:
            later.module._compiled_call_impl = None
        self._waiting = []
