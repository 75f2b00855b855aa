"""Reading adapter weights: a state dict, a file, or a file in a folder or Hub repo (``weight_name=``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from diffloom import hub
from diffloom.modeling import load_pickle, load_safetensors


def read_weights(source, weight_name: str | None, default_names: tuple[str, ...], *, subfolder=None,
                 allow_pickle: bool = False, what: str = "adapter", **hub_kwargs) -> dict[str, torch.Tensor]:
    """The tensors of ``source``: a dict is returned as it is; a file is read; in a folder or Hub repo the file is
    ``weight_name`` or the first of ``default_names`` present. Pickle files follow the core rule (refused unless
    ``allow_pickle=True``, then loaded with ``torch.load(weights_only=True)``)."""
    if isinstance(source, dict):
        return source
    source = os.fspath(source)
    if os.path.isfile(source):
        path = Path(source)
    else:
        names = (weight_name,) if weight_name else default_names
        path = None
        for name in names:
            if hub.file_exists(source, name, subfolder, **hub_kwargs):
                path = hub.resolve_file(source, name, subfolder, **hub_kwargs)
                break
        if path is None:
            where = f"{source}/{subfolder}" if subfolder else source
            looked = f"looked for {', '.join(names)}; " if names else ""
            raise hub.LoadError(f"no {what} weights in {where}: {looked}pass weight_name= to name the file")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    data = load_pickle(path, allow_pickle)
    if not isinstance(data, dict):
        raise hub.LoadError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return data
