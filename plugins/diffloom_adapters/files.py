"""Reading adapter weights: a state dict, a file, or a file in a folder or Hub repo (``weight_name=``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from diffloom import hub
from diffloom.modeling import load_pickle, load_safetensors

# Files a folder may hold next to the weights that are never the weights (diffusers skips them too).
_NOT_WEIGHTS = ("scheduler", "optimizer", "checkpoint")


def read_weights(source, weight_name: str | None, default_names: tuple[str, ...], *, subfolder=None,
                 allow_pickle: bool = False, use_safetensors: bool | None = None, guess: bool = False,
                 with_metadata: bool = False, what: str = "adapter", **hub_kwargs):
    """The tensors of ``source``: a dict is returned as it is; a file is read; in a folder or Hub repo the file is
    ``weight_name`` or the first of ``default_names`` present. With ``guess``, a folder whose file has another name
    gives its ``.safetensors`` file (or, with none, its ``.bin``), as diffusers guesses a LoRA's file name.

    ``use_safetensors=True`` reads only safetensors files, ``False`` only pickles. Pickle files follow the core rule
    (refused unless ``allow_pickle=True``, then loaded with ``torch.load(weights_only=True)``). With
    ``with_metadata``, returns ``(tensors, metadata)``: the safetensors header's metadata (None for a dict or a
    pickle)."""
    metadata = None
    if isinstance(source, dict):
        tensors = source
    else:
        path = _locate(os.fspath(source), weight_name, default_names, subfolder, use_safetensors, guess, what,
                       hub_kwargs)
        if path.suffix == ".safetensors":
            tensors = load_safetensors(path)
            if with_metadata:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata()
        else:
            tensors = load_pickle(path, allow_pickle)
            if not isinstance(tensors, (dict, torch.Tensor)):  # a bare tensor is a textual inversion embedding
                raise hub.LoadError(f"{path} holds a {type(tensors).__name__}, not a dict of tensors")
    return (tensors, metadata) if with_metadata else tensors


def _locate(source: str, weight_name, default_names, subfolder, use_safetensors, guess, what, hub_kwargs) -> Path:
    if os.path.isfile(source):
        return Path(source)
    if Path(source).suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt") and not os.path.isdir(source):
        raise hub.LoadError(f"{what} file {source} does not exist")
    names = [weight_name] if weight_name else [n for n in default_names if _allowed(n, use_safetensors)]
    for name in names:
        if hub.file_exists(source, name, subfolder, **hub_kwargs):
            return hub.resolve_file(source, name, subfolder, **hub_kwargs)
        if guess and not weight_name:
            # A folder whose weights have their own name: any file of this kind before the next default name.
            found = _guess(source, subfolder, Path(name).suffix, hub_kwargs)
            if found is not None:
                return hub.resolve_file(source, found, subfolder, **hub_kwargs)
    where = f"{source}/{subfolder}" if subfolder else source
    looked = f"looked for {', '.join(names)}{' or any such file' if guess else ''}; " if names else ""
    raise hub.LoadError(f"no {what} weights in {where}: {looked}pass weight_name= to name the file")


def _allowed(name: str, use_safetensors) -> bool:
    return use_safetensors is None or name.endswith(".safetensors") == use_safetensors


def _guess(source: str, subfolder, suffix: str, hub_kwargs) -> str | None:
    """The ``suffix`` file of a folder; files named like schedulers, optimizers or training checkpoints are not
    weights. With several candidates the first by name is read, with a warning."""
    try:
        files = hub.list_folder(source, **hub_kwargs)
    except (OSError, ValueError):
        return None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    found = sorted(f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]
                   and f.endswith(suffix) and not any(word in f for word in _NOT_WEIGHTS))
    if len(found) > 1:
        warnings.warn(f"{source} holds several {suffix} files ({', '.join(found)}); reading {found[0]}. Pass "
                      f"weight_name= to choose another", stacklevel=5)
    return found[0] if found else None
