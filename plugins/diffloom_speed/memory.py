"""diffusers' memory options: model offloading to the CPU, and sliced or tiled VAE decoding.

``enable_model_cpu_offload`` keeps every model on the CPU and moves each to the GPU when it is called,
sending the previous one back: peak GPU memory becomes that of the largest model (the UNet) plus its
activations, at the cost of copying each model to the GPU and back once per call. The pipeline's ``device``
reports the GPU meanwhile, so latents and embeddings are made there.

Each model's weights wait in pinned (page-locked) host memory, allocated once: the GPU copies from and into it
by DMA at full bus speed, where ``module.to("cpu")`` would allocate fresh pageable memory on every move.
"""

from __future__ import annotations

import functools
import itertools
import threading

import torch

from .step_graphs import CudaGraphSteps

# The methods through which pipelines run a model: a VAE is used through encode/decode, not forward.
_ENTRY_POINTS = ("forward", "encode", "decode")


class _PinnedModel:
    """One model whose tensors live in pinned host memory and visit the GPU while it runs."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module
        self.device = device
        self.tensors = list(itertools.chain(module.parameters(), module.buffers()))
        for tensor in self.tensors:
            tensor.data = tensor.data.to("cpu").pin_memory()
        self.host = [tensor.data for tensor in self.tensors]

    def to_device(self):
        # Ordered on the stream before the kernels that read them: no need to wait for the copies.
        for tensor, host in zip(self.tensors, self.host):
            tensor.data = host.to(self.device, non_blocking=True)

    def to_host(self):
        # Copied back, not just dropped: the weights may have changed on the GPU (a LoRA fused meanwhile).
        for tensor, host in zip(self.tensors, self.host):
            host.copy_(tensor.data)
            tensor.data = host


class MemoryOptions:
    def __init__(self, pipe):
        self.pipe = pipe
        self._wrapped: list[tuple[torch.nn.Module, str]] = []
        self._pinned: dict[int, _PinnedModel] = {}
        self._on_gpu: _PinnedModel | None = None
        # Held while a model runs, so a concurrent call cannot send it back to the CPU under another thread.
        self._lock = threading.RLock()

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda"):
        device = torch.device(device)
        if device.type == "cpu":
            raise ValueError("enable_model_cpu_offload(device=...) must name an accelerator such as 'cuda'; "
                             "the models already wait on the CPU")
        if gpu_id is not None:
            device = torch.device(device.type, gpu_id)
        elif device.index is None and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        if any(isinstance(hook, CudaGraphSteps) for hook in self.pipe.hooks):
            raise RuntimeError("enable_model_cpu_offload cannot run with the fast path (its CUDA graphs need the "
                               "models to stay on the GPU); call pipe.disable_fast_path() first")
        self.remove_all_hooks()
        for module in self._models():
            pinned = self._pinned[id(module)] = _PinnedModel(module, device)
            for name in _ENTRY_POINTS:
                if callable(getattr(type(module), name, None)):
                    self._wrap(module, name, pinned)
        self.pipe._execution_device = device
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def remove_all_hooks(self):
        """Undo ``enable_model_cpu_offload``: the models stay where they are (``pipe.to(...)`` moves them)."""
        for module, name in self._wrapped:
            del module.__dict__[name]
        self._wrapped = []
        self._pinned = {}
        self._on_gpu = None
        self.pipe.__dict__.pop("_execution_device", None)

    def _models(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    def _wrap(self, module: torch.nn.Module, name: str, pinned: _PinnedModel):
        method = getattr(module, name)

        @functools.wraps(method)
        def on_device(*args, **kwargs):
            with self._lock:
                if self._on_gpu is not pinned:
                    if self._on_gpu is not None:
                        self._on_gpu.to_host()
                    pinned.to_device()
                    self._on_gpu = pinned
                return method(*args, **kwargs)

        module.__dict__[name] = on_device
        self._wrapped.append((module, name))

    def enable_vae_slicing(self):
        """Decode (and encode) a batch one image at a time: VAE memory no longer grows with the batch."""
        self._vae().enable_slicing()

    def disable_vae_slicing(self):
        self._vae().disable_slicing()

    def enable_vae_tiling(self):
        """Decode (and encode) large images in overlapping tiles: VAE memory no longer grows with the image."""
        self._vae().enable_tiling()

    def disable_vae_tiling(self):
        self._vae().disable_tiling()

    def _vae(self):
        vae = self.pipe.components.get("vae")
        if vae is None or not hasattr(vae, "enable_slicing"):
            raise AttributeError(f"{type(self.pipe).__name__} has no VAE with slicing and tiling switches")
        return vae
