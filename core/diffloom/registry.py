"""The plugin registry: finds plugins through entry points, records what each provides, imports lazily.

Plugins are scanned once, on the first question. A plugin whose entry module fails to import, or whose
registration hook raises, is reported and skipped; the others keep working. A name claimed by two plugins is
refused (the later claim fails and names both providers) unless the later one passes ``override=True``.

Environment:
  DIFFLOOM_LOAD_PLUGINS   comma-separated allow-list of plugin names (entry-point or distribution names);
                          set but empty loads no plugin at all.
  DIFFLOOM_BLOCK_PLUGINS  comma-separated block-list.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import threading
import warnings
from dataclasses import dataclass, field

import pluggy

from . import hookspecs

if sys.version_info >= (3, 12):
    from importlib.metadata import entry_points
else:
    from importlib_metadata import entry_points

ENTRY_POINT_GROUP = "diffloom"
KINDS = ("pipeline", "scheduler", "model", "adapter", "callback", "command")
_HOOK_FOR_KIND = {
    "pipeline": "register_pipelines",
    "scheduler": "register_schedulers",
    "model": "register_models",
    "adapter": "register_adapters",
    "callback": "register_callbacks",
    "command": "register_commands",
}


class RegistryError(LookupError):
    """A name nobody provides, or one that two plugins claim."""


@dataclass
class Entry:
    kind: str
    name: str
    target: object  # "module:attr" or the object itself
    provider: str
    meta: dict = field(default_factory=dict)
    override: bool = False
    overrides: str | None = None

    def load(self):
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:
            raise RegistryError(
                f"{self.kind} {self.name!r} of plugin {self.provider!r} could not be imported from "
                f"{self.target!r}: {type(e).__name__}: {e}"
            ) from e
        self.target = obj
        return obj


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    provides: dict = field(default_factory=dict)  # kind -> [names]
    notes: list = field(default_factory=list)

    def as_dict(self, hooks):
        d = {"name": self.name, "distribution": self.distribution, "version": self.version, "hooks": hooks,
             "provides": {k: sorted(v) for k, v in self.provides.items() if v}}
        if self.notes:
            d["notes"] = self.notes
        if self.error:
            d["error"] = self.error
        return d


def _env_list(name):
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


class Registry:
    def __init__(self, autoload: bool = True):
        self.pm = pluggy.PluginManager("diffloom")
        self.pm.add_hookspecs(hookspecs)
        self.autoload = autoload
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._conflicts: dict[tuple[str, str], list[str]] = {}
        self._plugins: dict[str, PluginInfo] = {}
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading ---------------------------------------------------------------------------------------------

    def ensure_loaded(self):
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            if self.autoload:
                self._load_entry_points()

    def _load_entry_points(self):
        allow = _env_list("DIFFLOOM_LOAD_PLUGINS")
        block = _env_list("DIFFLOOM_BLOCK_PLUGINS") or set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            names = {ep.name, dist}
            if allow is not None and not names & allow:
                continue
            if names & block:
                continue
            info = PluginInfo(ep.name, dist, ep.dist.version if ep.dist is not None else None)
            try:
                plugin = ep.load()
            except Exception as e:
                info.error = f"import of {ep.value!r} failed: {type(e).__name__}: {e}"
                self._plugins[ep.name] = info
                warnings.warn(f"diffloom plugin {ep.name!r} was skipped: {info.error}", stacklevel=3)
                continue
            self._add(plugin, info)

    def register_plugin(self, plugin, name: str | None = None):
        """Register a plugin object by hand (a module or any object with hook implementations)."""
        self.ensure_loaded()
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin):x}"
        with self._lock:
            self._add(plugin, PluginInfo(name))
        return name

    def unregister_plugin(self, name: str):
        with self._lock:
            self.pm.unregister(name=name)
            self._plugins.pop(name, None)
            for kind in KINDS:
                for key in [k for k, e in self._entries[kind].items() if e.provider == name]:
                    del self._entries[kind][key]

    def _add(self, plugin, info: PluginInfo):
        if info.name in self._plugins and self._plugins[info.name].error is None:
            raise RegistryError(f"a plugin named {info.name!r} is already registered")
        self._plugins[info.name] = info
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as e:
            info.error = f"registration failed: {type(e).__name__}: {e}"
            return
        for kind, hook_name in _HOOK_FOR_KIND.items():
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():
                if impl.plugin_name != info.name:
                    continue
                try:
                    impl.function(register=self._registrar(kind, info))
                except Exception as e:
                    info.error = f"{hook_name} raised {type(e).__name__}: {e}"
                    warnings.warn(f"diffloom plugin {info.name!r}: {info.error}", stacklevel=4)

    def _registrar(self, kind: str, info: PluginInfo):
        def register(name: str, target, override: bool = False, **meta):
            table = self._entries[kind]
            previous = table.get(name)
            entry = Entry(kind, name, target, info.name, meta, override=override)
            if previous is None or previous.provider == info.name:
                table[name] = entry
            elif override and not previous.override:
                entry.overrides = previous.provider
                table[name] = entry
            elif previous.override and not override:
                # An explicit override wins whichever plugin happened to load first.
                previous.overrides = info.name
                self._plugins[previous.provider].notes.append(
                    f"{kind} {name!r} overrides the one from {info.name!r}")
                return
            else:
                message = (f"{kind} {name!r} is provided by both {previous.provider!r} and {info.name!r}; "
                           f"uninstall one, block one with DIFFLOOM_BLOCK_PLUGINS, or register with override=True")
                self._conflicts[(kind, name)] = [previous.provider, info.name]
                info.error = message
                warnings.warn(message, stacklevel=2)
                return
            if entry.overrides:
                info.notes.append(f"{kind} {name!r} overrides the one from {entry.overrides!r}")
            info.provides.setdefault(kind, []).append(name)

        return register

    # -- questions -------------------------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        self.ensure_loaded()
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        self.ensure_loaded()
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def entry(self, kind: str, name: str) -> Entry | None:
        self.ensure_loaded()
        conflict = self._conflicts.get((kind, name))
        if conflict:
            raise RegistryError(f"{kind} {name!r} is claimed by both {conflict[0]!r} and {conflict[1]!r}; "
                                f"block one with DIFFLOOM_BLOCK_PLUGINS")
        return self._entries[kind].get(name)

    def get(self, kind: str, name: str):
        entry = self.entry(kind, name)
        if entry is None:
            raise RegistryError(self.unknown_message(kind, name))
        return entry.load()

    def find_class(self, name: str):
        """The class registered under ``name`` as a pipeline, scheduler, model or callback, or ``None``."""
        for kind in ("pipeline", "scheduler", "model", "callback"):
            entry = self.entry(kind, name)
            if entry is not None:
                return entry.load()
        return None

    def unknown_message(self, kind: str, name: str) -> str:
        known = self.names(kind)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"no installed plugin provides the {kind} {name!r}{hint} (see `diffloom {kind}s`)"

    def plugins(self, include_builtin: bool = True) -> list[dict]:
        self.ensure_loaded()
        out = []
        for name, info in self._plugins.items():
            if not include_builtin and info.distribution == "diffloom":
                continue
            plugin = self.pm.get_plugin(name)
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or ()) if plugin is not None else []
            out.append(info.as_dict(hooks))
        return out


registry = Registry()


def delegated_classmethod(name: str):
    """A classmethod of a core base class whose body a plugin supplies.

    An adapter plugin that registers ``class_methods=[name]`` provides ``Target.name(cls, *args, **kwargs)``;
    ``SomePipeline.name(...)`` calls it with the class it was called on. This is how ``from_single_file``
    reaches every pipeline and model without the core knowing the single-file layout.
    """

    def method(cls, *args, **kwargs):
        for entry in registry.entries("adapter"):
            if name in entry.meta.get("class_methods", ()):
                return getattr(entry.load(), name)(cls, *args, **kwargs)
        raise AttributeError(f"{cls.__name__}.{name} is provided by a plugin, and none that provides it is "
                             f"installed or allowed (see `diffloom plugins`)")

    method.__name__ = method.__qualname__ = name
    return classmethod(method)
