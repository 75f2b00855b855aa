"""Finding and loading the pipeline a command works on, and the sampling defaults stored next to it."""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from diffloom.cli import UsageError

SHIPPED_MODEL = Path(__file__).parent / "shipped" / "shapes-128"
# A small JSON file a model folder may carry: how that model samples best. Keys and the type of each:
DEFAULTS_FILE = "diffloom_defaults.json"
DEFAULT_KEYS = {"num_inference_steps": int, "guidance_scale": (int, float), "scheduler": str}
DTYPES = ("float32", "float16", "bfloat16")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def model_source(model: str | None, label: str = "--model") -> str:
    """The folder or Hub repo id that ``model`` names (the shipped model when it is None); ``label`` is how
    error messages call the argument."""
    if model is None:
        return str(SHIPPED_MODEL)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{label} {model}: the folder has no model_index.json; give a pipeline folder in the "
                             f"diffusers layout (one with model_index.json, unet/, vae/...)")
        return str(path)
    if path.exists():
        raise UsageError(f"{label} {model} is a file; give a pipeline folder or a Hub repo id (owner/name)")
    if _REPO_ID.fullmatch(model) and not model.startswith("."):
        return model
    raise UsageError(f"{label} {model}: no such folder (and not a Hub repo id of the form owner/name)")


def load_pipeline(source: str, dtype: str | None = None, device: str | None = None):
    """``DiffusionPipeline.from_pretrained`` with its errors turned into one-line usage errors."""
    import torch

    from transformers.utils import logging as transformers_logging

    from diffloom import DiffusionPipeline

    transformers_logging.disable_progress_bar()  # the per-file loading bars would bury the command's own
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=getattr(torch, dtype) if dtype else None)
    except (OSError, LookupError, ValueError) as e:
        raise UsageError(f"cannot load the model {source}: {one_line(e)}") from None
    if device is not None:
        try:
            pipe.to(device)
        except (RuntimeError, AssertionError) as e:  # no such device, or torch built without it
            raise UsageError(f"--device {device}: {one_line(e)}") from None
    return pipe


def sampling_defaults(source: str) -> dict:
    """The model's stored defaults (``diffloom_defaults.json``), or {} when it has none. Call it after loading
    the pipeline: for a Hub repo the file came with the pipeline's JSON files and is read from the cache."""
    from diffloom import hub

    try:
        path = hub.resolve_file(source, DEFAULTS_FILE, local_files_only=True)
    except hub.LoadError:
        return {}
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not valid JSON: {one_line(e)}") from None
    for key, value in values.items():
        if key not in DEFAULT_KEYS:
            raise UsageError(f"{path}: unknown key {key!r}; the keys understood are {', '.join(DEFAULT_KEYS)}")
        if not isinstance(value, DEFAULT_KEYS[key]) or isinstance(value, bool):
            raise UsageError(f"{path}: {key} = {value!r} has the wrong type")
    return values


def scheduler_class(name: str, label: str = "--scheduler"):
    """The registered scheduler class called ``name``; an unknown name lists the close ones."""
    from diffloom.registry import registry

    names = registry.names("scheduler")
    if name in names:
        return registry.get("scheduler", name)
    close = close_names(name, names)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the schedulers are {', '.join(names)}"
    raise UsageError(f"{label} {name}: no such scheduler{hint} (see `diffloom schedulers`)")


def close_names(query: str, names: list[str], limit: int = 4) -> list[str]:
    """Names that ``query`` probably meant: it is part of them, or it is spelled like one of their leading
    CamelCase words ("eulr" -> Euler -> EulerDiscreteScheduler), ignoring case, '-' and '_'."""
    def fold(text):
        return text.lower().replace("-", "").replace("_", "")

    wanted = fold(query)
    scored = []
    for name in names:
        words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+", name)
        keys = {fold("".join(words[:i])) for i in range(1, len(words) + 1)}
        best = max(difflib.SequenceMatcher(None, wanted, key).ratio() for key in keys)
        if wanted and wanted in fold(name):
            best = max(best, 0.9)
        if best >= 0.75:
            scored.append((-best, name))
    return [name for _, name in sorted(scored)[:limit]]


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def writable_parent(path: Path, what: str):
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path}: cannot write into {parent}")
