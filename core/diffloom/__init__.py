"""diffloom: a small, pluggable diffusion-pipeline framework that reads and writes the diffusers format.

``import diffloom`` is cheap: nothing here imports torch. Names are resolved on first use, either from the
core (below) or through the plugin registry, so ``from diffloom import StableDiffusionPipeline`` works although
that class lives in a plugin.
"""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (pluggy only)

# Core names and the module that defines each; imported when first asked for.
_CORE = {
    "ConfigMixin": "configuration",
    "FrozenDict": "configuration",
    "register_to_config": "configuration",
    "BaseOutput": "outputs",
    "SchedulerMixin": "scheduling",
    "SchedulerOutput": "scheduling",
    "ModelMixin": "modeling",
    "DiffusionPipeline": "pipeline",
    "ImagePipelineOutput": "pipeline",
    "CallState": "loop",
    "StepState": "loop",
    "PipelineCallback": "callbacks",
    "MultiPipelineCallbacks": "callbacks",
    "SDCFGCutoffCallback": "callbacks",
    "SDXLCFGCutoffCallback": "callbacks",
    "SDXLControlnetCFGCutoffCallback": "callbacks",
    "IPAdapterScaleCutoffCallback": "callbacks",
    "load_image": "images",
    "make_image_grid": "images",
    "VaeImageProcessor": "images",
    "randn_tensor": "randomness",
    "registry": "registry",
}

__all__ = ["hookimpl", *_CORE]


def __getattr__(name):
    import importlib

    if name in _CORE:
        module = importlib.import_module(f"{__name__}.{_CORE[name]}")
        value = getattr(module, name)
    elif name.startswith("__"):
        raise AttributeError(name)
    else:
        from .registry import registry

        value = registry.find_class(name)
        if value is None:
            import difflib

            known = list(_CORE)
            for kind in ("pipeline", "scheduler", "model", "callback"):
                known += registry.names(kind)
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AttributeError(f"diffloom has no attribute {name!r} and no installed plugin provides it{hint}")
    globals()[name] = value
    return value


def __dir__():
    from .registry import registry

    names = set(globals()) | set(_CORE)
    for kind in ("pipeline", "scheduler", "model", "callback"):
        names.update(registry.names(kind))
    return sorted(names)
