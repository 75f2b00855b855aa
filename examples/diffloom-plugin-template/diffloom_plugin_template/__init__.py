"""A diffloom plugin: a pipeline, a scheduler and a denoising-loop hook, all registered through hooks.

diffloom imports this module when it scans plugins (``diffloom plugins`` does, and so does the first
``from diffloom import ...`` of a name it does not know yet), so it stays light: it names the classes by import
path and never imports torch. The modules that hold the classes are imported when a class is first used.
"""

from diffloom import hookimpl

from .hooks import on_step_end  # noqa: F401  (a loop hook: every pipeline call of every pipeline fires it)


@hookimpl
def register_pipelines(register):
    # ``community=`` also makes it loadable as DiffusionPipeline.from_pretrained(..., custom_pipeline="template")
    register("TemplatePipeline", "diffloom_plugin_template.pipeline:TemplatePipeline", community="template")


@hookimpl
def register_schedulers(register):
    register("TemplateDDIMScheduler", "diffloom_plugin_template.scheduler:TemplateDDIMScheduler")
