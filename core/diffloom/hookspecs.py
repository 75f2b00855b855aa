"""Every way to extend diffloom, in one file.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names match the specs below. It is
found through the entry-point group ``diffloom``; the built-in schedulers, models and pipelines register
exactly the same way. Register names with import paths ("package.module:Class") so that listing plugins
never imports torch: the class is imported when something first asks for it.

Three families of hooks:

* registration: ``register_*(register)``; call ``register(name, "module:attr", **meta)`` once per thing.
  ``register(..., override=True)`` replaces a name another plugin already claimed (reported in
  ``diffloom plugins``); without it a second claim is refused.
* resolution (``firstresult``): the first plugin that answers wins.
* the denoising loop: fired by every pipeline at fixed execution points. Each receives the pipeline and the
  per-call :class:`diffloom.loop.CallState` (``call``); hooks that may change something receive a mutable
  object and change its attributes, so the next implementation sees the change.
"""

import pluggy

hookspec = pluggy.HookspecMarker("diffloom")
hookimpl = pluggy.HookimplMarker("diffloom")


# -- registration --------------------------------------------------------------------------------------------


@hookspec
def register_pipelines(register):
    """Register pipeline classes: ``register("StableDiffusionPipeline", "pkg.mod:StableDiffusionPipeline")``.

    Meta keys understood: ``community=True`` marks a pipeline loadable by ``custom_pipeline=name``;
    ``aliases=[...]`` adds extra names for ``custom_pipeline=``.
    """


@hookspec
def register_schedulers(register):
    """Register scheduler classes by name."""


@hookspec
def register_models(register):
    """Register model classes (UNets, autoencoders, ControlNets...) by name."""


@hookspec
def register_adapters(register):
    """Register adapters: ``register("lora", "pkg.mod:LoraAdapter", methods=["load_lora_weights", ...])``.

    ``methods`` are the pipeline methods the adapter provides. ``pipe.load_lora_weights(...)`` creates one
    ``LoraAdapter(pipe)`` per pipeline (kept for its lifetime, shared by ``from_pipe``) and calls its
    ``load_lora_weights(...)``. Adapters attach to models only through documented extension points: torch
    forward hooks on linear/conv layers, and attention processors (``set_attn_processor``).

    ``class_methods`` name class-level entry points the core declares with
    :func:`diffloom.registry.delegated_classmethod` (``from_single_file``): ``Pipeline.from_single_file(...)``
    calls ``Target.from_single_file(Pipeline, ...)`` of the plugin that lists it.
    """


@hookspec
def register_callbacks(register):
    """Register callback classes (``PipelineCallback`` subclasses) by name."""


@hookspec
def register_commands(register):
    """Register CLI sub-commands: ``register("generate", "pkg.cli:generate_command", help="...")``.

    The target is a function ``command(argparse.ArgumentParser) -> run(args) -> int | None``: it adds its
    arguments to the parser it is given and returns the function that runs the command.
    """


# -- resolution ----------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def resolve_custom_pipeline(name, model_path, revision, trust_remote_code):
    """Return the pipeline class that ``custom_pipeline=name`` means, or ``None`` to let others answer."""


# -- denoising-loop execution points -------------------------------------------------------------------------


@hookspec
def on_call_start(pipe, call):
    """A pipeline call begins; ``call`` holds its arguments and per-call state."""


@hookspec
def on_step_begin(pipe, call, step):
    """A denoising step begins; ``step.index``, ``step.timestep`` and ``step.latents`` are set."""


@hookspec
def before_denoiser(pipe, call, step):
    """Just before the denoiser runs.

    May replace ``step.model_input`` (the latents as the model will see them, CFG batch included),
    ``step.model_timestep`` or entries of ``step.conditioning`` (keyword arguments of the denoiser, such as
    ``encoder_hidden_states``).
    """


@hookspec
def after_denoiser(pipe, call, step):
    """Just after the denoiser ran.

    ``step.model_output`` is the raw prediction (CFG batch included). Set ``step.noise_pred`` to supply the
    guided prediction yourself (another guidance rule); leave it ``None`` and the pipeline's own rule applies.
    """


@hookspec(firstresult=True)
def run_step(pipe, call, step):
    """Take over the body of one step: model input, denoiser, guidance and scheduler step.

    Return the new latents to replace what the pipeline would compute (an accelerator replaying that body as a
    CUDA graph), or ``None`` to let the pipeline run it. A step taken over fires neither ``before_denoiser``
    nor ``after_denoiser``, so an implementation must decline while either has implementations in the call.
    ``on_step_begin`` and ``on_step_end`` fire around it as usual.
    """


@hookspec
def on_step_end(pipe, call, step):
    """A step finished; ``step.latents`` holds the new latents and may be replaced.

    The diffusers ``callback_on_step_end`` is delivered here.
    """


@hookspec
def after_decode(pipe, call, images):
    """The latents were decoded; ``images`` is the decoded batch (a tensor in [-1, 1] for image pipelines).

    Return a replacement or ``None``; the last non-None return is used.
    """


@hookspec
def on_call_end(pipe, call, output):
    """A pipeline call finished (also after an interrupt); ``output`` is what it returns."""
