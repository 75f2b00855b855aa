"""``pipe.enable_fast_path()``: the pipeline's GPU fast path, switched on with one call.

- ``compile=False`` (quick mode): every step's denoiser and guidance replay from a CUDA graph recorded over
  the eager kernels (:mod:`.step_graphs`). Ready after one recording, about a second.
- ``compile=True``: the same graphs, recorded again over the UNet and the VAE decoder compiled by
  ``torch.compile`` (Inductor fuses the norms, activations and residual adds that eager runs as separate
  kernels). Nobody waits for the compiler: calls run in quick mode while a worker thread compiles the models
  for the first call's shapes (:mod:`.background_compile`); the calls after it has finished run compiled.
  ``pipe.wait_for_fast_path()`` waits for it. Inductor caches its output on disk (``TORCHINDUCTOR_CACHE_DIR``,
  by default under the system's temporary folder), so later processes compile much faster.

Both put the convolutional models in channels-last layout, which the GPU's convolution kernels prefer, and let
SDXL pipelines decode in float16 unless that overflows (``vae_float16_first``). Images differ from eager ones
only by float16 rounding (different kernels sum in a different order).
"""

from __future__ import annotations

import torch

from .background_compile import BackgroundCompiler
from .step_graphs import CudaGraphSteps

# Inductor settings: 1x1 convolutions as matrix multiplies lets Inductor fuse their epilogues. Shapes stay static
# (dynamic=False): each image size gets kernels of its own, compiled in the background, and CUDA graphs need
# fixed shapes anyway.
INDUCTOR_OPTIONS = {"conv_1x1_as_mm": True}
_CONVOLUTIONAL = ("unet", "vae", "controlnet")


class FastPath:
    def __init__(self, pipe):
        self.pipe = pipe
        self.graphs: CudaGraphSteps | None = None
        self.compiler: BackgroundCompiler | None = None

    def enable_fast_path(self, compile: bool = True):
        """Replay each step's denoiser from a CUDA graph; with ``compile=True`` also compile the UNet and the
        VAE decoder, in the background. Needs the pipeline on a CUDA device. Call again to switch ``compile`` on
        or off."""
        pipe = self.pipe
        name = type(pipe).__name__
        if pipe.device.type != "cuda":
            raise RuntimeError(f"enable_fast_path needs the {name} on a CUDA GPU, but it is on {pipe.device}; "
                               f"call pipe.to('cuda') first (and not enable_model_cpu_offload)")
        if pipe.__dict__.get("_execution_device") is not None:
            raise RuntimeError(f"enable_fast_path cannot run while the {name} offloads its models to the CPU (its "
                               f"CUDA graphs need them to stay on the GPU); call pipe.remove_all_hooks() and "
                               f"pipe.to('cuda') first")
        if not pipe.denoiser_components:
            raise ValueError(f"{name}'s denoiser step reads more than its inputs (see DiffusionPipeline."
                             f"denoiser_components), so it cannot be replayed from a CUDA graph")
        self.disable_fast_path()
        for component in _CONVOLUTIONAL:
            module = pipe.components.get(component)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.channels_last)
        if compile:
            models = (pipe.components.get("unet"), getattr(pipe.components.get("vae"), "decoder", None))
            self.compiler = BackgroundCompiler([m for m in models if isinstance(m, torch.nn.Module)],
                                               lambda fn: torch.compile(fn, dynamic=False, options=INDUCTOR_OPTIONS))
            pipe.hooks.append(self.compiler)
        if hasattr(type(pipe), "vae_float16_first"):
            pipe.vae_float16_first = True
        self.graphs = CudaGraphSteps(compiler=self.compiler)
        pipe.hooks.append(self.graphs)

    def wait_for_fast_path(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) for the background compilation that the first fast-path call
        started; re-raise its error. True once the compiled models are in use; False when nothing was
        compiled (quick mode, or no call yet)."""
        return self.compiler.wait(timeout) if self.compiler is not None else False

    def disable_fast_path(self):
        """Back to eager: recordings dropped, models uncompiled and in their default memory layout."""
        pipe = self.pipe
        if self.graphs is not None:
            self.graphs.clear()
            pipe.hooks.remove(self.graphs)
            self.graphs = None
        if self.compiler is not None:
            self.compiler.detach()
            pipe.hooks.remove(self.compiler)
            self.compiler = None
        pipe.__dict__.pop("vae_float16_first", None)
        for component in _CONVOLUTIONAL:
            module = pipe.components.get(component)
            if isinstance(module, torch.nn.Module):
                module.to(memory_format=torch.contiguous_format)
