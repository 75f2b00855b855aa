"""Result objects: attribute access, key access and tuple unpacking, as diffusers' outputs allow."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict


class BaseOutput(OrderedDict):
    """Subclass with ``@dataclass``; fields left at ``None`` are absent from the mapping and the tuple."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                OrderedDict.__setitem__(self, field.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if name in {f.name for f in dataclasses.fields(self)} and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def __setitem__(self, key, value):
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())
