"""Configuration objects in the diffusers on-disk format.

A configurable class (scheduler, model) decorates its ``__init__`` with :func:`register_to_config`; every
argument, given or defaulted, is recorded in ``self.config``, a read-only mapping that is written as
``config.json`` / ``scheduler_config.json`` with ``_class_name`` and ``_diffusers_version`` so diffusers reads
our folders and we read theirs.

Keys a class does not take are kept in the config (and written back) but never passed to ``__init__``: that
is how a config survives a trip through a compatible class (``Euler.from_config(ddim.config)``).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path

# The diffusers release whose format we write; diffusers reads any config whose version is not newer than it.
DIFFUSERS_FORMAT_VERSION = "0.30.0"

# Recorded in memory only: the init arguments that took their default. When the config moves to another
# class, those keys are dropped so the new class applies its own defaults (diffusers behaves the same way).
_DEFAULTED = "_use_default_values"


class ConfigError(ValueError):
    """A config file or dictionary that cannot be used."""


class FrozenDict(dict):
    """A dict that refuses changes and also answers attribute access (``config.num_train_timesteps``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "a config is read-only; build a new object with `Class.from_config(obj.config, key=value)` instead"
        )

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _refuse
    pop = popitem = setdefault = update = clear = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def init_keys(cls) -> set[str]:
    """Names a class's ``__init__`` accepts (without ``self`` and ``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class ConfigMixin:
    """Base for classes whose constructor arguments form a saved config."""

    config_name: str = "config.json"
    ignore_for_config: tuple[str, ...] = ()

    @property
    def config(self) -> FrozenDict:
        return self._internal_dict

    def register_to_config(self, **kwargs):
        current = dict(getattr(self, "_internal_dict", {}))
        current.update(kwargs)
        object.__setattr__(self, "_internal_dict", FrozenDict(current))

    # -- reading ---------------------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                    return_unused_kwargs: bool = False, **kwargs):
        """Read ``cls.config_name`` from a folder (or Hub id); returns a plain dict, or with
        ``return_unused_kwargs`` the pair (dict, keyword arguments that were not for the Hub)."""
        from . import hub

        hub_kwargs = hub.split_hub_kwargs(kwargs)
        if kwargs and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__}.load_config got unexpected arguments {sorted(kwargs)}; it takes "
                            f"subfolder, return_unused_kwargs and the Hub arguments {list(hub.HUB_KWARGS)}")
        path = hub.resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder=subfolder, **hub_kwargs)
        config = read_json(path)
        return (config, kwargs) if return_unused_kwargs else config

    @classmethod
    def from_config(cls, config: dict | None = None, return_unused_kwargs: bool = False, **kwargs):
        """Build an instance from a config dict; ``kwargs`` override config values."""
        if config is None:
            raise ConfigError(f"{cls.__name__}.from_config needs a config dict as its first argument")
        if not isinstance(config, dict):
            raise ConfigError(
                f"{cls.__name__}.from_config takes a config dict, got {type(config).__name__}; "
                f"to read a folder use {cls.__name__}.from_pretrained(path)"
            )
        init_kwargs, hidden, unused = cls.split_config(config, kwargs)
        obj = cls(**init_kwargs)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        obj.register_to_config(**hidden)
        if return_unused_kwargs:
            return obj, {**unused, **hidden}
        return obj

    @classmethod
    def split_config(cls, config: dict, overrides: dict) -> tuple[dict, dict, dict]:
        """Split a config into (init kwargs, keys to keep without passing, overrides nobody took)."""
        defaulted = set(config.get(_DEFAULTED, ()))
        config = {k: v for k, v in config.items() if k not in defaulted and k != _DEFAULTED}
        expected = init_keys(cls) - set(cls.ignore_for_config)

        # Keys that belong to a sibling class (a compatible scheduler) are kept but never passed on.
        foreign = set()
        for other in cls.compatible_classes():
            foreign |= init_keys(other)
        source = config.get("_class_name")
        if isinstance(source, str) and source != cls.__name__:
            other = _lookup_class(source)
            if other is not None:
                foreign |= init_keys(other)
        foreign -= expected

        init_kwargs = {}
        overrides = dict(overrides)
        for key in expected:
            if key in overrides:
                init_kwargs[key] = overrides.pop(key)
            elif key in config and not key.startswith("_") and key not in foreign:
                init_kwargs[key] = config[key]
        hidden = {k: v for k, v in config.items() if k not in init_kwargs}
        return init_kwargs, hidden, overrides

    @classmethod
    def compatible_classes(cls) -> list[type]:
        return []

    # -- writing ---------------------------------------------------------------------------------------------

    def to_json_string(self) -> str:
        # Where the object was loaded from is not written: a saved folder must not point at the saver's disk.
        data = {k: _jsonable(v) for k, v in self.config.items() if k not in (_DEFAULTED, "_name_or_path")}
        data["_class_name"] = type(self).__name__
        data.setdefault("_diffusers_version", DIFFUSERS_FORMAT_VERSION)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory, **_):
        if os.path.isfile(save_directory):
            raise ConfigError(f"save_config needs a folder, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        Path(save_directory, self.config_name).write_text(self.to_json_string(), encoding="utf-8")

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


def register_to_config(init):
    """Decorate ``__init__`` so every argument (given or defaulted) lands in ``self.config``."""
    signature = inspect.signature(init)
    names = [n for n, p in signature.parameters.items() if n != "self" and p.kind != p.VAR_KEYWORD]

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        hidden = {k: v for k, v in kwargs.items() if k.startswith("_")}
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        ignore = set(getattr(self, "ignore_for_config", ()))
        bound = signature.bind(self, *args, **kwargs)
        given = set(bound.arguments) - {"self"}
        bound.apply_defaults()
        recorded = {n: bound.arguments[n] for n in names if n not in ignore and n in bound.arguments}
        defaulted = sorted(n for n in recorded if n not in given)
        if defaulted:
            recorded[_DEFAULTED] = defaulted
        self.register_to_config(**hidden, **recorded)
        init(self, *args, **kwargs)

    return wrapped


def read_json(path) -> dict:
    """Read a JSON object from ``path``; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _lookup_class(name: str):
    from .registry import registry

    return registry.find_class(name)
