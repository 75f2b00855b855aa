"""The model base class: diffusers-format folders in and out, weights loaded straight into a meta-built module.

A model is built on the meta device (no memory, no random initialisation), then its parameters are replaced
by the tensors read from safetensors (``load_state_dict(assign=True)``). Models must therefore keep all their
state in the state dict: a buffer that is not saved would be left on the meta device (compute such values in
``forward`` instead).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import warnings
from pathlib import Path

import torch

from . import hub
from .configuration import ConfigMixin
from .registry import delegated_classmethod

WEIGHTS_NAME = "diffusion_pytorch_model"
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class WeightsError(hub.LoadError):
    """Weights that do not fit the model, or a file that cannot be read."""


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers' variant naming: the variant goes before the last suffix, so ``x.safetensors`` becomes
    ``x.fp16.safetensors`` and the index ``x.safetensors.index.json`` becomes ``x.safetensors.index.fp16.json``."""
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def variant_of(filename: str) -> str | None:
    """The variant a weight file belongs to: "fp16" for ``x.fp16.safetensors`` or ``x.fp16-00001-of-00002.bin``,
    None for ``x.safetensors`` or ``x-00001-of-00002.safetensors``."""
    stem = filename.rpartition("/")[2].rpartition(".")[0]
    _, dot, variant = stem.partition(".")
    return re.sub(r"-\d+-of-\d+$", "", variant) if dot else None


def parse_size(size) -> int:
    """'5GB', '200MB', '10KB' or an int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size such as '5GB' or '200MB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    return int(float(m.group(1)) * units[m.group(2).lower()])


def resolve_dtype_arguments(dtype, torch_dtype):
    """diffusers renamed ``torch_dtype`` to ``dtype`` and accepts either; both at once is a mistake."""
    if dtype is not None and torch_dtype is not None:
        raise ValueError("pass dtype or torch_dtype, not both: dtype is the newer name of the same argument")
    return torch_dtype if dtype is None else dtype


# accelerate's placement strategies: on a machine without an accelerator they place everything on the CPU.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_from_map(device_map) -> torch.device | None:
    """The one device a ``device_map`` names (a device, or ``{"": device}``); None for no map.

    A model is never split over devices, so a map with several entries, or a placement strategy on a machine
    with an accelerator, is refused with the argument that does work."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise NotImplementedError(f"device_map={device_map!r} places parts of a model on different devices, "
                                      f"which diffloom does not do; pass one device, e.g. device_map='cuda'")
        device_map = device_map[""]
    accelerator = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else None
    if device_map in DEVICE_MAP_STRATEGIES:
        if accelerator is not None:
            raise NotImplementedError(f"device_map={device_map!r} spreads the weights over several devices, which "
                                      f"diffloom does not do; pass device_map={accelerator!r} to load them onto "
                                      f"the {accelerator} device")
        return torch.device("cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", accelerator):
        # Refused before anything is read: a loaded model would fail only when it is moved.
        here = f"'cpu' or {accelerator!r}" if accelerator is not None else "only 'cpu' (no accelerator)"
        raise ValueError(f"device_map={device_map!r} names no device of this machine, which has {here}; pass "
                         f"one of those devices, or the placement strategy 'balanced'")
    return device


def as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"torch_dtype={dtype!r} is not a torch dtype (try torch.float16 or 'bfloat16')")
    return value


def refuse_push_to_hub(push_to_hub: bool):
    if push_to_hub:
        raise NotImplementedError("save_pretrained does not upload; save to a folder, then upload it with "
                                  "huggingface_hub.upload_folder(repo_id=..., folder_path=...)")


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a damaged file is reported by name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); the file may be truncated: "
                           f"download or save it again") from None


def load_pickle(path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise WeightsError(
            f"{path} is a pickle file, and unpickling can run arbitrary code, so it is refused. Convert it to "
            f"safetensors, or pass allow_pickle=True if you trust its source (it is then loaded with "
            f"torch.load(weights_only=True))")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise WeightsError(f"{path} could not be loaded with torch.load(weights_only=True): {e}") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    return data


def save_state_dict(state_dict: dict, directory, name: str, variant: str | None = None, max_shard_size="10GB",
                    metadata=None) -> list[Path]:
    """Write ``state_dict`` as ``name`` (a .safetensors file name) of ``variant``; past ``max_shard_size`` it is split
    into shards plus an index, named and filled exactly as diffusers does (``x.fp16-00001-of-00003.safetensors``,
    ``x.safetensors.index.fp16.json``), so either library reads the other's folders."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    directory = Path(directory)
    # safetensors refuses tensors sharing storage (tied weights); each is written on its own.
    tensors = {k: v.detach().contiguous().clone() if _shares_storage(v, state_dict) else v.detach().contiguous()
               for k, v in state_dict.items()}
    file_name = _with_variant(name, variant)
    stem, _, ext = file_name.rpartition(".")
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=parse_size(max_shard_size),
                                               filename_pattern=f"{stem}{{suffix}}.{ext}")
    # Shards or an index left by an earlier save of the other layout would be picked up by a loader: clear them.
    for old in directory.glob(f"{stem}-*-of-*.{ext}"):
        if old.name not in split.filename_to_tensors:
            old.unlink()
    index_path = directory / _with_variant(f"{name}.index.json", variant)
    if split.is_sharded:
        (directory / file_name).unlink(missing_ok=True)
    else:
        index_path.unlink(missing_ok=True)
    meta = {"format": "pt", **(metadata or {})}
    written = []
    for shard_name, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(directory / shard_name), metadata=meta)
        written.append(directory / shard_name)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    return written


def _shares_storage(t: torch.Tensor, state_dict: dict) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in state_dict.values() if v.untyped_storage().data_ptr() == ptr) > 1


class ModelMixin(torch.nn.Module, ConfigMixin):
    """Base of every diffloom model: ``from_pretrained`` / ``save_pretrained`` in the diffusers layout."""

    config_name = "config.json"
    weights_name = WEIGHTS_NAME

    def __getattr__(self, name):
        # Config values read as attributes (``unet.in_channels``) as they do on diffusers models.
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("_internal_dict")
            if config is not None and name in config:
                return config[name]
            raise

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # -- loading ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, *, variant=None,
                        torch_dtype=None, dtype=None, use_safetensors: bool | None = None, allow_pickle: bool = False,
                        device_map=None, low_cpu_mem_usage: bool = True, output_loading_info: bool = False,
                        **kwargs):
        """Load a model folder (or Hub repo) in the diffusers layout.

        Weights are looked up as ``diffusion_pytorch_model[.variant].safetensors`` or its sharded
        ``.index.json``; a missing variant falls back to the plain file with a warning. Pickle files
        (``.bin``) are used only with ``allow_pickle=True`` and ``use_safetensors`` not True.
        ``dtype`` is diffusers' newer name for ``torch_dtype``; ``device_map`` names the one device the weights
        go to (``"cuda"``, ``0``, ``{"": "cuda:1"}``). ``low_cpu_mem_usage`` is accepted for diffusers'
        callers and always on: the model is built on the meta device. Other keyword arguments override config
        values.
        """
        hub_kwargs = hub.split_hub_kwargs(kwargs)
        torch_dtype = as_dtype(resolve_dtype_arguments(dtype, torch_dtype))
        device = device_from_map(device_map)
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        files = _find_weights(pretrained_model_name_or_path, subfolder, cls.weights_name, variant,
                              use_safetensors, allow_pickle, hub_kwargs)
        with _no_gc():
            with torch.device("meta"), _no_init_on_meta():
                model = cls.from_config(config, **kwargs)
            state_dict = {}
            for path in files:
                state_dict.update(load_pickle(path, allow_pickle) if path.suffix in _PICKLE_SUFFIXES
                                  else load_safetensors(path))
            model.load_weights(state_dict, source=files[0] if len(files) == 1 else files[0].parent,
                               dtype=torch_dtype)
        model.eval()
        model.register_to_config(_name_or_path=os.fspath(pretrained_model_name_or_path))
        if device is not None:
            model.to(device)
        if output_loading_info:
            # load_weights raises on any mismatch, so a loaded model never has one to report.
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return model

    # A single checkpoint file in the original Stable Diffusion layout, read by a plugin.
    from_single_file = delegated_classmethod("from_single_file")

    def load_weights(self, state_dict: dict, source="state dict", dtype: torch.dtype | None = None):
        """Assign ``state_dict`` into this (possibly meta-built) model; every mismatch is named.

        Tensors keep their storage where dtype allows (no copy); floating tensors are cast to ``dtype``,
        or to the dtype of the parameter they replace when ``dtype`` is None.
        """
        expected = self.state_dict(keep_vars=True)
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (first: {', '.join(missing[:5])})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys (first: {', '.join(unexpected[:5])})")
            raise WeightsError(f"{source} does not fit {type(self).__name__} with its config: "
                               f"{'; '.join(parts)}")
        modules = dict(self.named_modules())
        for key, target in expected.items():
            value = state_dict[key]
            if value.shape != target.shape:
                raise WeightsError(f"{source}: {key} has shape {tuple(value.shape)} but the config builds "
                                   f"{tuple(target.shape)}; the config.json does not match these weights")
            if value.is_floating_point():
                value = value.to(dtype or target.dtype)
            # What load_state_dict(assign=True) does, without its per-module bookkeeping (a third of load time).
            path, _, name = key.rpartition(".")
            module = modules[path]
            if name in module._parameters:
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=target.requires_grad)
            else:
                module._buffers[name] = value

    # -- saving ----------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, variant: str | None = None, max_shard_size="10GB",
                        safe_serialization: bool = True, push_to_hub: bool = False, **_):
        if not safe_serialization:
            raise ValueError("diffloom writes safetensors only; drop safe_serialization=False")
        refuse_push_to_hub(push_to_hub)
        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ValueError(f"save_pretrained needs a folder, but {save_directory} is a file")
        save_directory.mkdir(parents=True, exist_ok=True)
        self.save_config(save_directory)
        save_state_dict(self.state_dict(), save_directory, f"{self.weights_name}.safetensors", variant,
                        max_shard_size)


@contextlib.contextmanager
def _no_gc():
    """Building a model allocates thousands of small objects, which triggers full garbage collections that walk
    torch's whole object graph: most of the load time of a big UNet. Nothing built here is cyclic garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
                   "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_init_on_meta():
    """Skip torch.nn.init on meta tensors while a model is built for loading: the values are replaced anyway,
    and on big models the bookkeeping of initialising nothing costs more than reading the weights.
    Real tensors (another thread building a model meanwhile) are initialised as usual."""
    originals = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}

    def skipping(original):
        def init(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

        return init

    for name, original in originals.items():
        setattr(torch.nn.init, name, skipping(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.nn.init, name, original)


def _find_weights(root, subfolder, weights_name, variant, use_safetensors, allow_pickle, hub_kwargs) -> list[Path]:
    """The weight files of a model folder, shards in order; errors list what was looked for."""
    candidates = []
    for v in ([variant, None] if variant else [None]):
        if use_safetensors is not False:
            candidates.append(("index", _with_variant(f"{weights_name}.safetensors.index.json", v)))
            candidates.append(("file", _with_variant(f"{weights_name}.safetensors", v)))
        if use_safetensors is not True:
            candidates.append(("index", _with_variant(f"{weights_name}.bin.index.json", v)))
            candidates.append(("file", _with_variant(f"{weights_name}.bin", v)))
    for kind, name in candidates:
        try:
            path = hub.resolve_file(root, name, subfolder, **hub_kwargs)
        except hub.LoadError:
            continue
        if variant and f".{variant}." not in name:
            warnings.warn(f"{root}{'/' + subfolder if subfolder else ''} has no {variant!r} variant; "
                          f"loading {name} instead", stacklevel=3)
        if kind == "file":
            return [path]
        try:
            index = json.loads(path.read_text())
            shard_names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise WeightsError(f"{path} is not a valid shard index ({e})") from None
        return [hub.resolve_file(root, s, subfolder, **hub_kwargs) for s in shard_names]
    where = os.path.join(str(root), subfolder or "")
    looked = ", ".join(name for _, name in candidates)
    hint = ""
    if use_safetensors is not True and not allow_pickle:
        hint = " (pickle .bin files are only read with allow_pickle=True)"
    variants = _variants_in(Path(where), weights_name) if os.path.isdir(where) else []
    if variants:
        hint += f"; the folder holds the variant(s) {', '.join(variants)}: pass variant={variants[0]!r}"
    raise WeightsError(f"no weights in {where}: looked for {looked}{hint}")


def _variants_in(folder: Path, weights_name: str) -> list[str]:
    """The variants whose weight files (single or sharded) lie in ``folder``."""
    names = [p.name for p in folder.iterdir() if p.name.startswith(weights_name)
             and p.suffix in (".safetensors", ".bin")]
    return sorted({variant_of(n) for n in names} - {None})
