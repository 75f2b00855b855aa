"""The scheduler contract: what every noise scheduler offers a pipeline or a hand-written loop.

Concrete schedulers live in plugins. Each subclasses :class:`SchedulerMixin`, decorates ``__init__`` with
``register_to_config`` and implements ``set_timesteps``, ``scale_model_input``, ``step`` and ``add_noise``
with diffusers' signatures.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from .configuration import ConfigMixin
from .outputs import BaseOutput


@dataclass
class SchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor = None
    pred_original_sample: torch.Tensor | None = None


class SchedulerMixin(ConfigMixin):
    config_name = "scheduler_config.json"
    # Names of the scheduler classes that can be built from this one's config.
    _compatibles: tuple[str, ...] = ()
    order = 1

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        return_unused_kwargs: bool = False, **kwargs):
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KEYS if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        self.save_config(save_directory)

    @classmethod
    def compatible_classes(cls) -> list[type]:
        from .registry import RegistryError, registry

        found = []
        for name in dict.fromkeys((cls.__name__, *cls._compatibles)):
            try:
                klass = registry.find_class(name)
            except RegistryError as e:
                # One broken scheduler plugin must not stop conversions between the others.
                warnings.warn(f"compatible scheduler {name} is unavailable: {e}", stacklevel=2)
                continue
            if klass is not None:
                found.append(klass)
        return found

    @property
    def compatibles(self) -> list[type]:
        return self.compatible_classes()

    def for_call(self):
        """A private copy for one pipeline call: its timesteps and step state never touch this object."""
        return copy.deepcopy(self)


_HUB_KEYS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")
