"""AutoPipelines: the pipeline for a task (text-to-image, image-to-image, inpainting) of a model family.

``AutoPipelineForImage2Image.from_pretrained(folder)`` reads the folder's ``model_index.json``, looks up the
pipeline class it names, and loads the image-to-image pipeline of the same family; ``from_pipe(pipe)`` builds
it around ``pipe``'s components, shared by reference. The mapping is not a table here: pipeline classes
declare ``family`` and ``task`` (and ``variant="controlnet"`` for ControlNet ones) when they register, so a
plugin that registers, say, SDXL pipelines makes them reachable through the AutoPipelines.
"""

from __future__ import annotations

import os

from diffloom import hub
from diffloom.configuration import read_json
from diffloom.registry import registry

_UNCHANGED = object()


def pipeline_for_task(class_name: str, task: str, variant=_UNCHANGED) -> type:
    """The registered pipeline class doing ``task`` for the family of the pipeline called ``class_name``.

    ``variant`` picks e.g. the ControlNet flavour ("controlnet") or the plain one (None); by default the
    variant of ``class_name`` is kept.
    """
    entry = registry.entry("pipeline", class_name)
    if entry is None or "family" not in entry.meta:
        known = sorted({e.meta["family"] for e in registry.entries("pipeline") if "family" in e.meta})
        raise ValueError(f"AutoPipelines cannot map {class_name!r}: no installed plugin registers it with a model "
                         f"family (families known: {', '.join(known) or 'none'})")
    family = entry.meta["family"]
    if variant is _UNCHANGED:
        variant = entry.meta.get("variant")
    for candidate in registry.entries("pipeline"):
        meta = candidate.meta
        if meta.get("family") == family and meta.get("task") == task and meta.get("variant") == variant:
            return candidate.load()
    flavour = f" ({variant})" if variant else ""
    # The variant comes from an argument of the same name (controlnet=...): None asks for the plain pipeline.
    hint = f"; pass {variant}=None for the plain {task} pipeline" if variant else ""
    raise ValueError(f"no installed pipeline does {task} for the {family!r} family{flavour}, which {class_name} "
                     f"belongs to{hint}")


def _variant_from(kwargs: dict):
    """A ``controlnet=`` argument switches to (or, when None, away from) the ControlNet variant."""
    if "controlnet" not in kwargs:
        return _UNCHANGED
    if kwargs["controlnet"] is None:
        del kwargs["controlnet"]
        return None
    return "controlnet"


class _AutoPipeline:
    task: str

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not built directly; use {type(self).__name__}.from_pretrained("
                        f"path) or {type(self).__name__}.from_pipe(pipeline)")

    @classmethod
    def pipeline_class_for(cls, class_name: str, variant=_UNCHANGED) -> type:
        return pipeline_for_task(class_name, cls.task, variant)

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path, **kwargs):
        """Load the folder (or Hub repo) as this task's pipeline; arguments are those of
        ``DiffusionPipeline.from_pretrained`` (components to replace, ``torch_dtype``, Hub options...)."""
        hub_kwargs = hub.split_hub_kwargs(kwargs)
        index_path = hub.resolve_file(os.fspath(pretrained_model_or_path), "model_index.json", **hub_kwargs)
        class_name = read_json(index_path).get("_class_name")
        if not isinstance(class_name, str):
            raise ValueError(f"{index_path} names no pipeline class (_class_name is {class_name!r}), so "
                             f"{cls.__name__} cannot tell which family it belongs to")
        target = cls.pipeline_class_for(class_name, _variant_from(kwargs))
        return target.from_pretrained(pretrained_model_or_path, **hub_kwargs, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """This task's pipeline around ``pipeline``'s components (no copy); keyword arguments replace some."""
        target = cls.pipeline_class_for(type(pipeline).__name__, _variant_from(kwargs))
        return target.from_pipe(pipeline, **kwargs)


class AutoPipelineForText2Image(_AutoPipeline):
    task = "text2image"


class AutoPipelineForImage2Image(_AutoPipeline):
    task = "image2image"


class AutoPipelineForInpainting(_AutoPipeline):
    task = "inpaint"
