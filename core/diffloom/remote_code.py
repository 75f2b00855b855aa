"""Custom pipelines: what ``custom_pipeline=X`` means, and when code that is not an installed package may run.

Who provides ``custom_pipeline=X`` is asked through the ``resolve_custom_pipeline`` hook; the first plugin that
answers wins. The built-in answer is the hook implementation at the end of this module, registered through the
entry point ``remote_code`` like any plugin and marked ``trylast``, so an installed plugin can answer first. It
tries, in this order:

1. X is a path: a ``.py`` file, or a folder holding ``pipeline.py``;
2. X is the name of a pipeline an installed plugin registered, or one of its ``community=`` / ``aliases=`` names
   (the community pipelines shipped in ``diffloom_contrib`` are such a plugin, so they work offline);
3. X is a Hub repo id (``owner/name``): its ``pipeline.py`` is fetched through huggingface_hub at
   ``custom_revision`` (default: the main branch), which is pinned to the commit the cache resolved it to.

A ``model_index.json`` whose ``_class_name`` is ``[module, Class]`` names ``module.py`` in the model repo itself
(:func:`load_pipeline_from_repo_module`).

The rules for code that is not an installed package (cases 1 and 3, and the repo module):

* it runs only with ``trust_remote_code=True``; the refusal names the file and its sha256, so it can be read
  and checked before anyone passes the flag;
* ``DIFFLOOM_DISABLE_REMOTE_CODE=1`` refuses all of it, whatever the flag says;
* the bytes that were hashed are the bytes that run, as a module named after their content
  (``diffloom_remote.<stem>_<sha256[:16]>``), so two different ``pipeline.py`` files never replace each other
  and loading the same file twice reuses the module;
* the file must define exactly one ``DiffusionPipeline`` subclass itself (classes it imports do not count).

This module is imported when the registry scans plugins, so it must not import torch at module level.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import logging
import os
import re
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path

from . import hub
from .hookspecs import hookimpl
from .registry import RegistryError, registry

logger = logging.getLogger("diffloom.remote_code")

DISABLE_ENV = "DIFFLOOM_DISABLE_REMOTE_CODE"
MODULE_PREFIX = "diffloom_remote"
PIPELINE_FILE = "pipeline.py"

_lock = threading.RLock()


class RemoteCodeRefused(PermissionError):
    """Code that is not an installed package, refused (no ``trust_remote_code=True``, or the kill switch)."""


class CustomPipelineError(ValueError):
    """A custom pipeline file that does not define exactly one usable pipeline class."""


@dataclass(frozen=True)
class CodeOrigin:
    """Where the code of a loaded module came from; kept on the module as ``__diffloom_origin__``."""

    file: str  # the file that ran
    sha256: str
    repo_id: str | None = None  # for code from the Hub
    revision: str | None = None  # what the caller asked for ("main" when nothing was)
    commit: str | None = None  # the commit that revision resolved to

    def describe(self) -> str:
        if self.repo_id is None:
            return f"{self.file} (sha256 {self.sha256})"
        return (f"{Path(self.file).name} of Hub repo {self.repo_id} at commit {self.commit} ({self.file}, "
                f"sha256 {self.sha256})")


def origin_of(obj) -> CodeOrigin | None:
    """The :class:`CodeOrigin` of a class (or module) loaded from a file here; ``None`` for installed code."""
    module = obj if isinstance(obj, types.ModuleType) else sys.modules.get(getattr(obj, "__module__", ""))
    return getattr(module, "__diffloom_origin__", None)


# -- the entry points used by DiffusionPipeline.from_pretrained ----------------------------------------------


def load_custom_pipeline(custom_pipeline, source=None, revision=None, trust_remote_code=False):
    """The pipeline class ``custom_pipeline=`` names, asked of every plugin through ``resolve_custom_pipeline``.

    ``source`` is the model folder or repo being loaded, ``revision`` the ``custom_revision`` of a Hub pipeline.
    """
    name = os.fspath(custom_pipeline)
    registry.ensure_loaded()
    cls = registry.pm.hook.resolve_custom_pipeline(name=name, model_path=source, revision=revision,
                                                   trust_remote_code=trust_remote_code)
    if cls is None:
        raise RegistryError(_nobody_provides(name))
    return _checked_pipeline_class(cls, f"custom_pipeline={name!r}")


def load_pipeline_from_repo_module(class_name, source, trust_remote_code=False, **hub_kwargs):
    """The class ``[module, Class]`` of a ``model_index.json``: ``Class`` defined in ``module.py`` of ``source``.

    ``hub_kwargs`` (``revision``, ``cache_dir``...) are those the model itself is loaded with.
    """
    module_name, cls_name = class_name
    where = f"{source}: model_index.json _class_name {list(class_name)}"
    try:
        path = hub.resolve_file(source, f"{module_name}.py", **hub_kwargs)
    except hub.LoadError as e:
        raise hub.LoadError(f"{where} needs {module_name}.py next to model_index.json: {e}") from None
    origin_repo = None if os.path.isdir(os.fspath(source)) else os.fspath(source)
    revision = (hub_kwargs.get("revision") or "main") if origin_repo else None
    module = _load_file(path, trust_remote_code, repo_id=origin_repo, revision=revision)
    cls = module.__dict__.get(cls_name)
    if cls is None:
        found = [c.__name__ for c in _pipeline_classes(module)]
        raise CustomPipelineError(f"{where}: {path} defines no {cls_name!r}; pipeline classes it defines: "
                                  f"{found or 'none'}")
    return _checked_pipeline_class(cls, where)


# -- the built-in resolution --------------------------------------------------------------------------------


@hookimpl(trylast=True)
def resolve_custom_pipeline(name, model_path, revision, trust_remote_code):
    """The built-in answer: a local file or folder, a registered (or community) name, or a Hub repo id."""
    path = Path(name).expanduser()
    if path.is_file():
        return load_pipeline_file(path, trust_remote_code)
    if (path / PIPELINE_FILE).is_file():
        return load_pipeline_file(path / PIPELINE_FILE, trust_remote_code)
    entry = _registered(name)
    if entry is not None:
        return entry.load()
    if path.is_dir():
        raise FileNotFoundError(f"custom_pipeline={name!r} is a folder without {PIPELINE_FILE}; point it at the "
                                f".py file that defines the pipeline, or add {PIPELINE_FILE}")
    looks_like_path = "/" in name or os.sep in name
    if name.endswith(".py") or (looks_like_path and not hub._looks_like_repo_id(name)):
        raise FileNotFoundError(f"custom_pipeline={name!r}: no such file or folder")
    if "/" in name:
        return load_hub_pipeline(name, revision, trust_remote_code)
    return None


def load_pipeline_file(path, trust_remote_code=False):
    """The one pipeline class a local ``.py`` file defines (it runs only with ``trust_remote_code=True``)."""
    path = Path(path).resolve()
    return _only_pipeline_class(_load_file(path, trust_remote_code), path)


def load_hub_pipeline(repo_id, revision=None, trust_remote_code=False):
    """The pipeline class of ``pipeline.py`` in Hub repo ``repo_id`` at ``revision`` (a branch, tag or commit)."""
    path = hub.resolve_file(repo_id, PIPELINE_FILE, revision=revision)
    return _only_pipeline_class(_load_file(path, trust_remote_code, repo_id=repo_id, revision=revision or "main"),
                                path)


# -- names -------------------------------------------------------------------------------------------------


def _names_of(entry) -> list[str]:
    names = [entry.name]
    community = entry.meta.get("community")
    if isinstance(community, str):
        names.append(community)
    names += list(entry.meta.get("aliases", ()))
    return names


def _registered(name):
    matches = [e for e in registry.entries("pipeline") if name in _names_of(e)]
    if len({(e.provider, e.name) for e in matches}) > 1:
        claims = ", ".join(f"{e.name} of plugin {e.provider!r}" for e in matches)
        raise RegistryError(f"custom_pipeline={name!r} is ambiguous: {claims}; use a pipeline's own name, or "
                            f"block one plugin with DIFFLOOM_BLOCK_PLUGINS")
    return matches[0] if matches else None


def community_names() -> list[str]:
    """Names of the community pipelines installed plugins offer for ``custom_pipeline=``."""
    names = []
    for entry in registry.entries("pipeline"):
        community = entry.meta.get("community")
        if community:
            names += [community if isinstance(community, str) else entry.name, *entry.meta.get("aliases", ())]
    return sorted(names)


def _nobody_provides(name) -> str:
    if not registry.pm.hook.resolve_custom_pipeline.get_hookimpls():
        return (f"custom_pipeline={name!r}: no plugin resolves custom pipelines; the built-in plugin "
                f"'remote_code' is not loaded (left out by DIFFLOOM_LOAD_PLUGINS or DIFFLOOM_BLOCK_PLUGINS, or "
                f"diffloom's entry points are missing: reinstall it)")
    community = community_names()
    known = sorted({n for e in registry.entries("pipeline") for n in _names_of(e)})
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"custom_pipeline={name!r} is neither a file, nor a community pipeline ({', '.join(community) or 'none'}"
            f"), nor a pipeline of an installed plugin (see `diffloom pipelines`){hint} A local pipeline needs "
            f"its path (a .py file or a folder holding {PIPELINE_FILE}), a Hub pipeline its repo id (owner/name); "
            f"diffusers' GitHub community folder is not searched: download the file and pass its path")


# -- running files -----------------------------------------------------------------------------------------


def _remote_code_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _load_file(path: Path, trust_remote_code, repo_id=None, revision=None) -> types.ModuleType:
    """Run ``path`` as a module named after its content, once per process, if the rules allow it."""
    path = Path(path)
    source = path.read_bytes()
    sha = hashlib.sha256(source).hexdigest()
    # In huggingface_hub's cache a file lives in snapshots/<commit>/..., so its folder names the commit.
    commit = _snapshot_commit(path) if repo_id else None
    origin = CodeOrigin(str(path), sha, repo_id, revision, commit)
    if _remote_code_disabled():
        raise RemoteCodeRefused(f"{origin.describe()} was not run: {DISABLE_ENV}=1 refuses all code that is not "
                                f"an installed package, even with trust_remote_code=True")
    if not trust_remote_code:
        raise RemoteCodeRefused(f"{origin.describe()} is code that is not an installed package; read it, then "
                                f"pass trust_remote_code=True to run it")
    stem = re.sub(r"\W", "_", path.stem)
    if repo_id:
        stem = re.sub(r"\W", "_", f"{repo_id.replace('/', '__')}__{commit}__{stem}")
    module_name = f"{MODULE_PREFIX}.{stem}_{sha[:16]}"
    with _lock:
        module = sys.modules.get(module_name)
        if module is not None:
            return module
        _ensure_namespace()
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        module.__diffloom_origin__ = origin
        # Registered before it runs, as import does: dataclasses and pickling look the module up by name.
        sys.modules[module_name] = module
        logger.info("running custom pipeline code %s as module %s", origin.describe(), module_name)
        try:
            # Compile the bytes that were hashed, not whatever the file holds by now.
            exec(compile(source, str(path), "exec"), module.__dict__)
        except ImportError as e:
            del sys.modules[module_name]
            raise ImportError(f"custom pipeline {path} could not import what it needs: {e}", name=e.name,
                              path=str(path)) from e
        except Exception as e:
            del sys.modules[module_name]
            raise CustomPipelineError(f"custom pipeline {path} raised {type(e).__name__} while it was imported: "
                                      f"{e}") from e
        return module


def _snapshot_commit(path: Path) -> str:
    for folder in path.parents:  # not path.resolve(): the cache's symlinks lead into blobs/
        if folder.parent.name == "snapshots":
            return folder.name
    raise hub.LoadError(f"{path} is not inside a huggingface_hub snapshot folder, so its commit is unknown")


def _ensure_namespace():
    if MODULE_PREFIX not in sys.modules:
        package = types.ModuleType(MODULE_PREFIX, "Modules loaded from custom pipeline files, named by content.")
        package.__path__ = []
        sys.modules[MODULE_PREFIX] = package


def _pipeline_classes(module) -> list[type]:
    from .pipeline import DiffusionPipeline

    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, DiffusionPipeline) and obj is not DiffusionPipeline
            and obj.__module__ == module.__name__]


def _only_pipeline_class(module, path) -> type:
    classes = _pipeline_classes(module)
    if len(classes) != 1:
        imported = sorted({obj.__name__ for obj in vars(module).values() if isinstance(obj, type)
                           and obj.__module__ != module.__name__ and _is_pipeline_class(obj)
                           and obj.__name__ != "DiffusionPipeline"})
        also = f" (imported, not counted: {', '.join(imported)})" if imported else ""
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise CustomPipelineError(f"{path} must define exactly one DiffusionPipeline subclass; it defines {found}"
                                  f"{also}. Keep one pipeline per file")
    return classes[0]


def _is_pipeline_class(obj) -> bool:
    from .pipeline import DiffusionPipeline

    return isinstance(obj, type) and issubclass(obj, DiffusionPipeline)


def _checked_pipeline_class(cls, where) -> type:
    if not _is_pipeline_class(cls):
        raise CustomPipelineError(f"{where} resolved to {cls!r}, which is not a DiffusionPipeline subclass")
    return cls
