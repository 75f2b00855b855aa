"""Community pipelines shipped with diffloom, one file each, loadable by ``custom_pipeline=<file name>``.

This module stays light: it names the classes, the pipeline modules hold them. It registers them like any
plugin would, under their class names (so a ``model_index.json`` naming ``MarigoldPipeline`` loads without
``custom_pipeline``) and under a ``community`` name, the file's name.
"""

from diffloom import hookimpl

PIPELINES = {
    # class name: module (and community name)
    "UnetSchedulerOneForwardPipeline": "one_step_unet",
    "MarigoldPipeline": "marigold_depth",
    "MarigoldDepthPipeline": "marigold_depth_pipeline",
    "CLIPGuidedStableDiffusion": "clip_guided_stable_diffusion",
}


@hookimpl
def register_pipelines(register):
    for name, module in PIPELINES.items():
        register(name, f"{__name__}.{module}:{name}", community=module)
