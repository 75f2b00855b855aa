"""Speed and memory switches on the pipeline: the fast path (CUDA graphs, optionally over torch.compile'd
models) and diffusers' memory options. This module stays light: the switches' modules load on first use."""

from diffloom import hookimpl

FAST_PATH_METHODS = ["enable_fast_path", "disable_fast_path", "wait_for_fast_path"]
MEMORY_METHODS = ["enable_model_cpu_offload", "remove_all_hooks", "enable_vae_slicing", "disable_vae_slicing",
                  "enable_vae_tiling", "disable_vae_tiling"]


@hookimpl
def register_adapters(register):
    register("fast_path", f"{__name__}.fast_path:FastPath", methods=FAST_PATH_METHODS)
    register("memory", f"{__name__}.memory:MemoryOptions", methods=MEMORY_METHODS)
