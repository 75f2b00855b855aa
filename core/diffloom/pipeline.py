"""The pipeline base class: components, ``model_index.json``, loading and saving, and the denoising loop.

A pipeline is a set of named components (models, schedulers, tokenizers...) listed by its ``__init__`` and
recorded in ``model_index.json`` as ``"name": [library, class]`` entries, exactly as diffusers writes them.
Subclasses implement ``__call__``; those that denoise run :meth:`DiffusionPipeline.denoise` inside
:meth:`DiffusionPipeline.start_call`, which fires every hook point and keeps per-call state off the object.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import hub
from .configuration import DIFFUSERS_FORMAT_VERSION, ConfigError, ConfigMixin, read_json
from .loop import CallState, StepState, current_call
from .modeling import (DEVICE_MAP_STRATEGIES, as_dtype, device_from_map, refuse_push_to_hub, resolve_dtype_arguments,
                       variant_of)
from .outputs import BaseOutput
from .registry import RegistryError, delegated_classmethod, registry

# Libraries whose class names diffloom serves itself: a folder written by diffusers says "diffusers".
_OWN_LIBRARIES = ("diffusers", "diffloom")
# Other libraries a model_index.json entry may make us import. Any other module is used only if already imported:
# importing runs its code, and a folder naming a module is no reason to run it (diffusers draws the same line).
_IMPORTABLE_LIBRARIES = ("transformers",)
# Config entries about the pipeline object itself rather than its components or settings.
_BOOKKEEPING_KEYS = ("_name_or_path", "_class_name", "_diffusers_version", "_use_default_values")
# The adapter methods diffusers users call; named here only to explain their absence clearly.
_ADAPTER_METHODS = ("load_lora_weights", "set_adapters", "fuse_lora", "unfuse_lora", "unload_lora_weights",
                    "delete_adapters", "get_active_adapters", "get_list_adapters", "enable_lora", "disable_lora",
                    "load_textual_inversion", "unload_textual_inversion", "load_ip_adapter", "set_ip_adapter_scale",
                    "unload_ip_adapter")


@dataclass
class ImagePipelineOutput(BaseOutput):
    images: Any = None


class PipelineError(ValueError):
    """A pipeline folder or call that cannot be used."""


def _library_and_class(component) -> list:
    """The ``[library, class]`` entry diffusers expects for a component in ``model_index.json``."""
    if component is None:
        return [None, None]
    cls = type(component)
    name = cls.__name__
    for kind in ("model", "scheduler", "pipeline"):
        entry = registry.entry(kind, name)
        if entry is not None and entry.load() is cls:
            return [entry.meta.get("library", "diffusers"), name]
    return [cls.__module__.split(".")[0], name]


def resolve_class(library, class_name, where):
    """The class a ``model_index.json`` entry ``[library, class_name]`` names; ``where`` prefixes errors.

    diffusers names its own classes by library "diffusers" or by a pipeline module ("stable_diffusion"): both
    are served by whatever plugin registered that class name."""
    if library not in _OWN_LIBRARIES:
        module = sys.modules.get(library)
        if module is None and library in _IMPORTABLE_LIBRARIES:
            try:
                module = importlib.import_module(library)
            except ImportError:
                module = None
        if module is not None:
            cls = getattr(module, class_name, None)
            if cls is None:
                raise PipelineError(f"{where}: {library} has no class {class_name!r} (is your {library} too old?)")
            return cls
    cls = registry.find_class(class_name)
    if cls is None:
        hint = ""
        if library not in _OWN_LIBRARIES and library not in sys.modules:
            hint = (f"; a folder naming the library {library!r} does not make diffloom import it: import it "
                    f"yourself first if it provides {class_name}, or pass the component as an argument")
        raise RegistryError(f"{where}: {registry.unknown_message('model', class_name)}{hint}")
    return cls


def init_parameters(cls) -> tuple[list[str], list[str]]:
    """(required, optional) argument names of a pipeline's ``__init__``."""
    required, optional = [], []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        (optional if p.default is not inspect.Parameter.empty else required).append(name)
    return required, optional


class DiffusionPipeline(ConfigMixin):
    config_name = "model_index.json"
    # Components a folder may lack or list as [null, null].
    _optional_components: list[str] = []
    # Names a callback_on_step_end may ask for and replace.
    _callback_tensor_inputs: list[str] = ["latents"]
    # The components that run_denoiser and guide call, for pipelines where those two read nothing but
    # step.model_input, step.model_timestep, step.conditioning and the call's scalar settings (guidance
    # scale...): an accelerator's run_step hook may then record them once and replay the recording for any step
    # with inputs of the same shapes. Empty where they read more (per-step state): never replayed.
    denoiser_components: tuple[str, ...] = ()

    def __init__(self):
        object.__setattr__(self, "_components", {})
        self.hooks: list = []
        self._progress_bar_config: dict = {}
        self._last_call: CallState | None = None

    # -- components ------------------------------------------------------------------------------------------

    def register_modules(self, **components):
        for name, component in components.items():
            self._components[name] = component
            self.register_to_config(**{name: _library_and_class(component)})

    def __getattr__(self, name):
        components = self.__dict__.get("_components")
        if components is not None and name in components:
            call = current_call()
            if call is not None and call.pipe is self and name in call.components:
                return call.components[name]
            return components[name]
        if components is not None and not name.startswith("_"):
            method = self._adapter_method(name)
            if method is not None:
                return method
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _adapter_method(self, name):
        """``pipe.load_lora_weights`` and friends: delegated to the adapter plugin that provides them."""
        for entry in registry.entries("adapter"):
            if name in entry.meta.get("methods", ()):
                adapters = self.__dict__.setdefault("_adapters", {})
                if entry.name not in adapters:
                    adapters[entry.name] = entry.load()(self)
                return getattr(adapters[entry.name], name)
        if name in _ADAPTER_METHODS:
            raise AttributeError(f"{type(self).__name__}.{name} is provided by an adapter plugin, and none that "
                                 f"provides it is installed or allowed (see `diffloom plugins`)")
        return None

    def __setattr__(self, name, value):
        components = self.__dict__.get("_components")
        if components is not None and name in components:
            self.register_modules(**{name: value})
        else:
            object.__setattr__(self, name, value)

    @property
    def components(self) -> dict[str, Any]:
        """Every ``__init__`` argument's current value: pass it to another pipeline's constructor."""
        required, optional = init_parameters(type(self))
        return {name: self._components.get(name, self.config.get(name))
                for name in required + optional if name in self._components or name in self.config}

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in self._components.items() if isinstance(m, torch.nn.Module)}

    def _first_module(self) -> torch.nn.Module | None:
        """The model whose device and dtype the pipeline reports: the first by component name, as in diffusers
        (an SD pipeline answers with its text encoder, whatever dtype its VAE was upcast to)."""
        for _, module in sorted(self._modules().items()):
            if next(module.parameters(), None) is not None:
                return module
        return None

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: its models' device, or the device an offloading plugin set as
        ``_execution_device`` while the models wait on the CPU."""
        execution_device = self.__dict__.get("_execution_device")
        if execution_device is not None:
            return execution_device
        module = self._first_module()
        return next(module.parameters()).device if module is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        module = self._first_module()
        parameters = module.parameters() if module is not None else ()
        return next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)

    @property
    def name_or_path(self) -> str | None:
        """The folder or Hub id the pipeline was loaded from."""
        return self.config.get("_name_or_path")

    def to(self, *args, **kwargs):
        """``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)``."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        if len(args) > 2:
            raise ValueError(f"{type(self).__name__}.to takes at most a device and a dtype, got {len(args)} "
                             f"arguments; e.g. pipe.to('cuda', torch.float16)")
        for arg in args:
            if isinstance(arg, torch.dtype):
                if dtype is not None:
                    raise ValueError("the dtype was given twice (as an argument and as dtype=); pass it once")
                dtype = arg
            else:
                if device is not None:
                    raise ValueError("the device was given twice (as an argument and as device=); pass it once")
                device = arg
        for module in self._modules().values():
            module.to(device=device, dtype=dtype)
        return self

    # -- per-call state ----------------------------------------------------------------------------------------

    def start_call(self, *, guidance_scale=1.0, hooks=(), callback_on_step_end=None,
                   callback_on_step_end_tensor_inputs=None, **settings) -> CallState:
        """Open a pipeline call; use as ``with self.start_call(...) as call:``.

        The call gets its own copy of the scheduler (``self.scheduler`` inside the call reads it), so
        concurrent calls never share step state.
        """
        call = CallState(self, guidance_scale=guidance_scale, hooks=hooks, callback=callback_on_step_end,
                         callback_tensor_inputs=callback_on_step_end_tensor_inputs, **settings)
        for name, component in self._components.items():
            if hasattr(component, "for_call"):
                call.components[name] = component.for_call()
        return call

    def _remember_call(self, call: CallState):
        self._last_call = call

    def _call_state(self) -> CallState:
        call = current_call()
        if call is not None and call.pipe is self:
            return call
        if self._last_call is not None:
            return self._last_call
        raise AttributeError(f"{type(self).__name__} has not been called yet, so it has no call state")

    def _call_attribute(name):  # noqa: N805 - builds properties below
        def get(self):
            return getattr(self._call_state(), name)

        def set_(self, value):
            setattr(self._call_state(), name, value)

        return property(get, set_)

    guidance_scale = _guidance_scale = _call_attribute("guidance_scale")
    interrupt = _interrupt = _call_attribute("interrupt")
    num_timesteps = _num_timesteps = _call_attribute("num_timesteps")
    guidance_rescale = _guidance_rescale = _call_attribute("guidance_rescale")
    clip_skip = _clip_skip = _call_attribute("clip_skip")
    cross_attention_kwargs = _cross_attention_kwargs = _call_attribute("cross_attention_kwargs")
    denoising_end = _denoising_end = _call_attribute("denoising_end")
    denoising_start = _denoising_start = _call_attribute("denoising_start")
    del _call_attribute

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._call_state().guidance_scale > 1

    # -- the denoising loop ------------------------------------------------------------------------------------

    def denoise(self, call: CallState, latents: torch.Tensor, timesteps, num_warmup_steps: int = 0) -> torch.Tensor:
        """Run the denoising loop over ``timesteps``, firing every step hook; returns the final latents.

        Each step: step-begin hooks -> the step's body (:meth:`denoising_step`, unless a ``run_step`` hook
        takes it over) -> step-end hooks (the diffusers callback among them). The body is
        ``prepare_model_input`` -> before_denoiser hooks -> ``run_denoiser`` -> after_denoiser hooks -> ``guide``
        (unless a hook set ``step.noise_pred``) -> ``scheduler_step``. Subclasses override those four methods,
        not the loop.
        """
        hook = call.hook
        call.num_timesteps = len(timesteps)
        call.settings["num_warmup_steps"] = num_warmup_steps
        call.tensors["latents"] = latents
        order = getattr(self.scheduler, "order", 1)
        n = len(timesteps)
        # The bar counts solver steps, not model calls (a second-order scheduler makes two per step).
        ticks = [i == n - 1 or (i + 1 > num_warmup_steps and (i + 1) % order == 0) for i in range(n)]
        with self.progress_bar(total=sum(ticks)) as bar:
            for i, t in enumerate(timesteps):
                if call.interrupt:
                    continue
                step = StepState(index=i, timestep=t, latents=call.tensors["latents"])
                hook.on_step_begin(pipe=self, call=call, step=step)
                latents = hook.run_step(pipe=self, call=call, step=step)
                step.latents = latents if latents is not None else self.denoising_step(call, step)
                call.tensors["latents"] = step.latents
                hook.on_step_end(pipe=self, call=call, step=step)
                call.tensors["latents"] = step.latents
                if ticks[i]:
                    bar.update()
        return call.tensors["latents"]

    def denoising_step(self, call: CallState, step: StepState) -> torch.Tensor:
        """The body of one step, unless a ``run_step`` hook takes it over; returns the new latents."""
        hook = call.hook
        self.prepare_model_input(call, step)
        hook.before_denoiser(pipe=self, call=call, step=step)
        step.model_output = self.run_denoiser(call, step)
        hook.after_denoiser(pipe=self, call=call, step=step)
        if step.noise_pred is None:
            step.noise_pred = self.guide(call, step)
        return self.scheduler_step(call, step)

    def prepare_model_input(self, call: CallState, step: StepState):
        """Fill ``step.model_input``, ``step.model_timestep`` and ``step.conditioning``."""
        step.model_input = self.scheduler.scale_model_input(step.latents, step.timestep)
        step.model_timestep = step.timestep

    def run_denoiser(self, call: CallState, step: StepState):
        raise NotImplementedError(f"{type(self).__name__} uses denoise() but does not define run_denoiser()")

    def guide(self, call: CallState, step: StepState):
        """Combine the raw model output into the prediction the scheduler steps with."""
        return step.model_output

    def scheduler_step(self, call: CallState, step: StepState):
        kwargs = call.settings.get("extra_step_kwargs", {})
        return self.scheduler.step(step.noise_pred, step.timestep, step.latents, **kwargs, return_dict=False)[0]

    # -- progress ----------------------------------------------------------------------------------------------

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable=None, total=None):
        from tqdm.auto import tqdm

        if iterable is not None:
            return tqdm(iterable, **self._progress_bar_config)
        if total is not None:
            return tqdm(total=total, **self._progress_bar_config)
        raise ValueError("progress_bar needs either an iterable or total=")

    # -- loading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a pipeline folder (or Hub repo) in the diffusers layout.

        Keyword arguments named like a component replace it (``vae=my_vae``, ``safety_checker=None``);
        ``torch_dtype`` (or its newer name ``dtype``) is one dtype or a dict per component
        (``{"unet": torch.float16, "default": ...}``; components it does not name, without a "default", load in
        float32 as in diffusers); ``variant`` applies to the components that have files of it (at least one
        must); ``use_safetensors``, ``allow_pickle`` and the Hub arguments (``revision``, ``cache_dir``,
        ``local_files_only``, ``token``) apply to every component. ``device_map`` is "cpu", a device such as
        "cuda" (every component is moved there), or "balanced", which on a machine without an accelerator
        leaves everything on the CPU. ``low_cpu_mem_usage`` is accepted and always on.
        """
        hub_kwargs = hub.split_hub_kwargs(kwargs)
        custom_pipeline = kwargs.pop("custom_pipeline", None)
        custom_revision = kwargs.pop("custom_revision", None)
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        allow_pickle = kwargs.pop("allow_pickle", False)
        source = os.fspath(pretrained_model_name_or_path)

        index_path = hub.resolve_file(source, cls.config_name, **hub_kwargs)
        config = read_json(index_path)
        pipeline_class = cls._pipeline_class_for(config, index_path, custom_pipeline, custom_revision,
                                                 trust_remote_code, source, hub_kwargs)
        required, optional = init_parameters(pipeline_class)
        folder_names = [n for n in required + optional if isinstance(config.get(n), (list, tuple))]
        listing = hub.list_folder(source, **hub_kwargs)
        variants = _component_variants(listing, folder_names, kwargs.pop("variant", None), index_path)
        # Components passed in are not read, so their folders are not fetched.
        needed = _files_to_fetch(listing, [n for n in folder_names if n not in kwargs], variants,
                                 kwargs.get("use_safetensors"))
        root = hub.resolve_folder(source, allow_patterns=needed, **hub_kwargs)
        return pipeline_class._build(root, config, index_path, kwargs, allow_pickle, source, variants)

    # A single checkpoint file in the original Stable Diffusion layout, read by a plugin.
    from_single_file = delegated_classmethod("from_single_file")

    @classmethod
    def _pipeline_class_for(cls, config, index_path, custom_pipeline, custom_revision, trust_remote_code, source,
                            hub_kwargs):
        if custom_pipeline is not None:
            from .remote_code import load_custom_pipeline

            return load_custom_pipeline(custom_pipeline, source, revision=custom_revision,
                                        trust_remote_code=trust_remote_code)
        class_name = config.get("_class_name")
        if isinstance(class_name, (list, tuple)):
            from .remote_code import load_pipeline_from_repo_module

            return load_pipeline_from_repo_module(class_name, source, trust_remote_code=trust_remote_code,
                                                  **hub_kwargs)
        if not cls._is_generic_loader():
            return cls
        if not isinstance(class_name, str):
            raise ConfigError(f"{index_path} has no _class_name naming the pipeline class")
        entry = registry.entry("pipeline", class_name)
        if entry is None:
            raise RegistryError(f"{index_path}: {registry.unknown_message('pipeline', class_name)}")
        return entry.load()

    @classmethod
    def _is_generic_loader(cls) -> bool:
        return cls is DiffusionPipeline

    @classmethod
    def _build(cls, root: Path, config: dict, index_path, kwargs: dict, allow_pickle: bool, source: str,
               variants: dict[str, str]):
        torch_dtype = resolve_dtype_arguments(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        use_safetensors = kwargs.pop("use_safetensors", None)
        device = _pipeline_device(kwargs.pop("device_map", None))
        kwargs.pop("low_cpu_mem_usage", None)  # always low: every model is built on the meta device
        required, optional = init_parameters(cls)
        components = {}
        for name in required + optional:
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            entry = config.get(name)
            if entry is not None and not isinstance(entry, (list, tuple)):
                components[name] = entry  # a plain config value such as requires_safety_checker
                continue
            if entry is None or None in entry:  # absent, or listed as [null, null]
                if name in required and name not in cls._optional_components:
                    state = "lists no component" if entry is None else "lists as [null, null] the component"
                    raise PipelineError(f"{index_path} {state} {name!r}, which {cls.__name__} requires; add it to "
                                        f"the folder or pass {name}=... to from_pretrained")
                if entry is not None or name in required:
                    components[name] = None
                continue
            library, class_name = entry
            components[name] = load_component(root, name, library, class_name, _dtype_for(torch_dtype, name),
                                               variants.get(name), use_safetensors, allow_pickle, index_path)
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {sorted(kwargs)}; "
                            f"its components are {required + optional}")
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=source)
        if device is not None:
            pipe.to(device)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs):
        """A ``cls`` pipeline that shares ``pipeline``'s components by reference (no copy, no dtype change
        unless ``torch_dtype``/``dtype`` is given); keyword arguments replace components or settings.

        Config entries of ``pipeline`` that ``cls`` does not take are kept in the new config under ``_name``
        (as diffusers does), so a later ``from_pipe`` back to a class that takes the setting restores it: the
        refiner's ``requires_aesthetics_score`` survives a trip through the text-to-image pipeline."""
        torch_dtype = resolve_dtype_arguments(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        target = cls._from_pipe_class(pipeline)
        required, optional = init_parameters(target)
        source = {k: v for k, v in pipeline.config.items() if k not in _BOOKKEEPING_KEYS}
        available = {**pipeline.components, **pipeline._components}
        components = {}
        for name in required + optional:
            if name in kwargs:
                components[name] = kwargs.pop(name)
            elif name in available:
                components[name] = available[name]
            elif f"_{name}" in source and name in optional and name not in target._optional_components:
                components[name] = source[f"_{name}"]  # a setting an earlier from_pipe put aside
            elif name in required and name not in target._optional_components:
                raise PipelineError(f"{target.__name__} needs a {name!r} component, which "
                                    f"{type(pipeline).__name__} lacks; pass {name}=... to from_pipe")
        if kwargs:
            raise TypeError(f"{target.__name__}.from_pipe got unexpected arguments {sorted(kwargs)}")
        pipe = target(**components)
        if "_name_or_path" in pipeline.config:
            pipe.register_to_config(_name_or_path=pipeline.config["_name_or_path"])
        put_aside = {(key if key.startswith("_") else f"_{key}"): value for key, value in source.items()
                     if key.removeprefix("_") not in components}
        pipe.register_to_config(**put_aside)
        pipe.hooks = list(pipeline.hooks)
        # Adapters live on the shared modules, so their bookkeeping is shared too.
        pipe.__dict__["_adapters"] = pipeline.__dict__.setdefault("_adapters", {})
        pipe.set_progress_bar_config(**pipeline._progress_bar_config)
        if torch_dtype is not None:
            pipe.to(as_dtype(torch_dtype))
        return pipe

    @classmethod
    def _from_pipe_class(cls, pipeline) -> type:
        return type(pipeline) if cls is DiffusionPipeline else cls

    # -- saving ------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, variant: str | None = None, max_shard_size="10GB",
                        safe_serialization: bool = True, push_to_hub: bool = False, **_):
        refuse_push_to_hub(push_to_hub)
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_pretrained needs a folder, but {save_directory} is a file")
        save_directory.mkdir(parents=True, exist_ok=True)
        # The index is written from the config minus where it was loaded from, which is not portable.
        index = {k: v for k, v in self.config.items() if k not in ("_name_or_path", "_use_default_values")}
        index["_class_name"] = type(self).__name__
        index.setdefault("_diffusers_version", DIFFUSERS_FORMAT_VERSION)
        (save_directory / self.config_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for name, component in self._components.items():
            if component is None:
                continue
            target = save_directory / name
            if isinstance(component, torch.nn.Module) and hasattr(component, "save_pretrained"):
                if _accepts(component.save_pretrained, "variant"):
                    component.save_pretrained(target, variant=variant, max_shard_size=max_shard_size,
                                              safe_serialization=safe_serialization)
                else:
                    component.save_pretrained(target, max_shard_size=max_shard_size)
            elif hasattr(component, "save_pretrained"):
                component.save_pretrained(target)
            else:
                raise PipelineError(f"component {name!r} ({type(component).__name__}) cannot be saved: it has "
                                    f"no save_pretrained")


def _dtype_for(torch_dtype, name: str) -> torch.dtype | None:
    """Component ``name``'s dtype from a ``torch_dtype`` that is one dtype or a dict per component."""
    if isinstance(torch_dtype, dict):
        # diffusers loads what the dict does not name, when it has no "default", in float32.
        return as_dtype(torch_dtype.get(name, torch_dtype.get("default", torch.float32)))
    return as_dtype(torch_dtype)


# Weight files, as opposed to the configs, tokenizer files and shard indexes that lie beside them.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def _component_weights(listing: list[str], name: str) -> list[str]:
    return [f for f in listing if f.startswith(f"{name}/") and f.endswith(_WEIGHT_SUFFIXES)]


def _component_variants(listing: list[str], names, variant, index_path) -> dict[str, str]:
    """The components whose folders hold weights of ``variant``: only they are loaded as that variant, the others
    as they are, as diffusers does; a variant no component has is an error."""
    if variant is None:
        return {}
    found = {name: variant for name in names
             if any(variant_of(f) == variant for f in _component_weights(listing, name))}
    if not found:
        raise PipelineError(f"no component folder next to {index_path} holds {variant!r} weights (such as "
                            f"diffusion_pytorch_model.{variant}.safetensors); drop variant={variant!r} or pass a "
                            f"variant the folder has")
    return found


def _files_to_fetch(listing: list[str], names, variants: dict[str, str], use_safetensors) -> list[str]:
    """The files of a pipeline repo that loading it reads: the top-level files that are not weights, and in each
    component folder to load, its other files plus the weights of one variant (its own, or none) in one format
    (safetensors where it has them, unless ``use_safetensors`` is False). A Hub repo often holds the same
    weights four times over (fp32 and fp16, safetensors and pickle): only one copy is downloaded."""
    needed = [f for f in listing if "/" not in f and not f.endswith(_WEIGHT_SUFFIXES)]
    for name in names:
        weights = [f for f in _component_weights(listing, name) if variant_of(f) == variants.get(name)]
        safetensors = [f for f in weights if f.endswith(".safetensors")]
        if use_safetensors is False:
            weights = [f for f in weights if f not in safetensors]
        elif safetensors:
            weights = safetensors
        needed += [f for f in listing if f.startswith(f"{name}/") and not f.endswith(_WEIGHT_SUFFIXES)] + weights
    return needed


def _pipeline_device(device_map) -> torch.device | None:
    """The device a pipeline's ``device_map`` names; diffusers' pipelines take "balanced", "cpu" or a device."""
    if device_map is None:
        return None
    if not isinstance(device_map, str):
        raise ValueError(f"device_map={device_map!r}: a pipeline's device_map is a string ('balanced', 'cpu' or a "
                         f"device such as 'cuda'); to place one component apart, load it with its own device_map "
                         f"and pass it as an argument")
    if device_map in DEVICE_MAP_STRATEGIES and device_map != "balanced":
        raise NotImplementedError(f"device_map={device_map!r} is not a pipeline placement; use 'balanced', 'cpu' "
                                  f"or a device such as 'cuda'")
    return device_from_map(device_map)


def _accepts(fn, name) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def load_component(root: Path, name, library, class_name, dtype, variant, use_safetensors, allow_pickle, index_path):
    """Load component ``name`` from ``root/name`` with the class its index entry names (models in ``dtype``);
    loaders of other layouts (single files) use it for the components they read from a folder."""
    where = f"{index_path} entry {name!r}"
    cls = resolve_class(library, class_name, where)
    folder = root / name
    if not folder.is_dir():
        raise PipelineError(f"{where} names {class_name}, but {folder} does not exist")
    if not hasattr(cls, "from_pretrained"):
        raise PipelineError(f"{where}: {class_name} has no from_pretrained and cannot be loaded from a folder")
    kwargs = {}
    from .modeling import ModelMixin

    if issubclass(cls, ModelMixin):
        kwargs = dict(torch_dtype=dtype, variant=variant, use_safetensors=use_safetensors, allow_pickle=allow_pickle)
    elif isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        kwargs = dict(variant=variant, use_safetensors=use_safetensors if allow_pickle else True)
        if dtype is not None:
            kwargs[_transformers_dtype_key()] = dtype
    return cls.from_pretrained(folder, **kwargs)


def _transformers_dtype_key() -> str:
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
