"""``from_single_file`` and ``save_single_file``: one checkpoint file in the original Stable Diffusion layout.

Reading: the file's keys tell the family (:mod:`.families`); each component's keys are cut out by prefix,
renamed (:mod:`.keys`) and assigned into a model built on the meta device from ``config=`` (a diffusers folder or
Hub id, of which only config and tokenizer files are read) or from the family's known config. Writing: the
reverse, from the pipeline's components.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from diffloom import hub
from diffloom.configuration import read_json
from diffloom.modeling import ModelMixin, as_dtype, load_pickle, load_safetensors
from diffloom.pipeline import DiffusionPipeline, init_parameters, load_component, resolve_class
from diffloom.registry import registry

from . import families, keys, original_config as ldm_config
from .families import CONTROLNET_PREFIX, UNET_PREFIX, VAE_PREFIX, Family


class SingleFileError(ValueError):
    """A single file, or a request about one, that cannot be served; says what would fix it."""


_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_HUB_URL = re.compile(r"https://huggingface\.co/([^/]+/[^/]+)/(?:blob|resolve)/([^/]+)/(.+)")
# Pipeline components whose weights a single file carries; model class -> its component name.
_FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_MODEL_COMPONENT = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "ControlNetModel": "controlnet"}


# -- reading the file ---------------------------------------------------------------------------------------

def read_checkpoint(path_or_url, allow_pickle=False, **hub_kwargs) -> dict[str, torch.Tensor]:
    """The tensors of a local file or a ``https://huggingface.co/owner/repo/blob/rev/file`` URL."""
    source = os.fspath(path_or_url)
    if m := _HUB_URL.fullmatch(source):
        repo, revision, filename = m.groups()
        folder, _, name = filename.rpartition("/")
        path = hub.resolve_file(repo, name, folder or None, **{"revision": revision, **hub_kwargs})
    elif source.startswith(("http://", "https://")):
        raise SingleFileError(f"{source}: only huggingface.co file URLs are fetched; download the file and pass "
                              f"its path")
    else:
        path = Path(source)
        if not path.is_file():
            raise SingleFileError(f"{source} is not a file (from_single_file reads one .safetensors or .ckpt file; "
                                  f"for a diffusers folder use from_pretrained)")
    if path.suffix in _PICKLE_SUFFIXES:
        return load_pickle(path, allow_pickle)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors (or a pickled "
                              f".ckpt with allow_pickle=True)")
    return load_safetensors(path)


def split(tensors: dict, family: Family, source) -> dict[str, dict]:
    """{component: {key without prefix: tensor}}; a key no component claims is refused by name."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX,
                **{name: prefix for name, (prefix, _) in family.text_encoders.items()}}
    parts = {name: {} for name in prefixes}
    unknown = []
    for key, value in tensors.items():
        owner = next((n for n, p in prefixes.items() if key.startswith(p)), None)
        if owner is not None and not key.startswith(families.IGNORED_PREFIXES):
            parts[owner][key[len(prefixes[owner]):]] = value
        elif key not in families.IGNORED_KEYS and not key.startswith(families.IGNORED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise SingleFileError(f"{source}: {len(unknown)} keys belong to no component of a {family.name} checkpoint "
                              f"(first: {keys.first(unknown)})")
    return {name: part for name, part in parts.items() if part}


# -- building models ------------------------------------------------------------------------------------------

def _config_root(config, hub_kwargs) -> Path | None:
    if config is None:
        return None
    return hub.resolve_folder(config, allow_patterns=["*.json", "*.txt", "*.model"], **hub_kwargs)


def _cast(value, dtype, target):
    return value.to(dtype or target.dtype) if value.is_floating_point() else value


def build_diffloom_model(cls, config: dict, kind: str, tensors: dict, dtype, where: str):
    """A diffloom UNet/ControlNet/VAE from its config and its LDM-named tensors."""
    with torch.device("meta"):
        model = cls.from_config(config)
    state = keys.model_from_original(kind, tensors, model.state_dict(), where)
    model.load_weights(state, source=where, dtype=dtype)
    return model.eval()


def build_text_encoder(class_name: str, config, style: str, tensors: dict, dtype, where: str):
    import transformers

    cls = getattr(transformers, class_name)
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    if style == "clip":
        state = keys.clip_from_original(tensors, expected, where)
    else:
        state = keys.openclip_from_original(tensors, expected, where, config.num_hidden_layers)
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(target.shape):
            raise SingleFileError(f"{where}: {key} has shape {tuple(state[key].shape)} but the text encoder config "
                                  f"builds {tuple(target.shape)}; pass config= with the matching model")
        state[key] = _cast(state[key], dtype, target)
    model.load_state_dict(state, strict=True, assign=True)
    # The position ids are a buffer no file holds; rebuild it where the meta device left it empty.
    for module in model.modules():
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape)
    return model.eval()


def _text_config(root, name, family):
    from transformers import CLIPTextConfig

    if root is not None and (root / name / "config.json").is_file():
        return CLIPTextConfig.from_pretrained(root / name)
    return CLIPTextConfig(**families.TEXT[family.name][name][1])


def _model_config(cls, root, name, family, ldm=None):
    if ldm is not None:
        defaults = families.VAE[family.name] if name == "vae" else families.UNET[family.name]
        return {**defaults, **(ldm_config.vae(ldm) if name == "vae" else ldm_config.unet(ldm))}
    if root is not None:
        folder = root if (root / "config.json").is_file() and not (root / "model_index.json").is_file() \
            else root / name
        if (folder / "config.json").is_file():
            return cls.load_config(folder)
    defaults = families.VAE[family.name] if name == "vae" else families.unet_config(family)
    return dict(defaults)


# -- pipelines ------------------------------------------------------------------------------------------------

def _index_entry(root, name):
    if root is None or not (root / "model_index.json").is_file():
        return None
    return read_json(root / "model_index.json").get(name)


def _original(config, original_config):
    if original_config is None:
        return None
    if config is not None:
        raise SingleFileError("pass config= (a diffusers folder) or original_config= (the training .yaml), not "
                              "both: each describes the whole model")
    return ldm_config.read(original_config)


def load_pipeline(cls, source, config=None, original_config=None, torch_dtype=None, allow_pickle=False,
                  **kwargs):
    hub_kwargs = hub.split_hub_kwargs(kwargs)
    dtype = as_dtype(torch_dtype)
    ldm = _original(config, original_config)
    tensors = read_checkpoint(source, allow_pickle, **hub_kwargs)
    family = families.detect(tensors)
    root = _config_root(config, hub_kwargs)
    if cls is DiffusionPipeline:
        class_name = (_index_entry(root, "_class_name") if root is not None else None) or family.pipeline
        cls = registry.get("pipeline", class_name)
    parts = split(tensors, family, source)
    required, optional = init_parameters(cls)
    for name in required + optional:
        # Checked first: a missing tokenizer is the usual mistake, and no amount of weights fixes it.
        if name.startswith("tokenizer") and name not in kwargs and _index_entry(root, name) is None \
                and _encoder_of(name) in parts:
            raise _no_tokenizer(cls, name)
    components = {}
    for name in required + optional:
        if name in kwargs:
            components[name] = kwargs.pop(name)
        elif name in _FILE_COMPONENTS:
            components[name] = _file_component(name, parts, family, root, ldm, dtype, source, cls, required)
        else:
            entry = _index_entry(root, name)
            if isinstance(entry, (list, tuple)) and entry[0] is not None and not _has_weights(root, name, entry):
                components[name] = load_component(root, name, entry[0], entry[1], None, None, None, False,
                                                   root / "model_index.json")
            elif entry is not None and not isinstance(entry, (list, tuple)):
                components[name] = entry  # a plain setting such as requires_safety_checker
            else:
                value = _default_component(name, family, cls, required, ldm)
                if value is not _OMIT:
                    components[name] = value
    if kwargs:
        raise TypeError(f"{cls.__name__}.from_single_file got unexpected arguments {sorted(kwargs)}; its "
                        f"components are {required + optional}")
    pipe = cls(**components)
    pipe.register_to_config(_name_or_path=os.fspath(source))
    return pipe


def _has_weights(root, name, entry) -> bool:
    """Models other than the file's (safety checker, image encoder) are not read from config=: only its config
    and tokenizer files are, so a Hub id costs no weight download."""
    return issubclass(resolve_class(entry[0], entry[1], f"{root} entry {name!r}"), torch.nn.Module)


def _file_component(name, parts, family, root, ldm, dtype, source, cls, required):
    if name not in parts:
        if name in required and name not in cls._optional_components:
            raise SingleFileError(f"{source} holds no {name} weights, which {cls.__name__} needs; pass {name}=...")
        return None
    where = f"{source} ({name}: keys under {_prefix_of(name, family)})"
    if name in ("unet", "vae"):
        model_cls = registry.get("model", "UNet2DConditionModel" if name == "unet" else "AutoencoderKL")
        return build_diffloom_model(model_cls, _model_config(model_cls, root, name, family, ldm), name,
                                    parts[name], dtype, where)
    entry = _index_entry(root, name)
    class_name = entry[1] if isinstance(entry, (list, tuple)) and entry[1] else families.TEXT[family.name][name][0]
    config = _text_config(root, name, family)
    return build_text_encoder(class_name, config, family.text_encoders[name][1], parts[name], dtype, where)


def _encoder_of(tokenizer_name: str) -> str:
    return tokenizer_name.replace("tokenizer", "text_encoder")


def _prefix_of(name, family) -> str:
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX}.get(name) or family.text_encoders[name][0]


def _no_tokenizer(cls, name) -> SingleFileError:
    return SingleFileError(
        f"a single file holds no tokenizer (its vocabulary files are not in the checkpoint), and {cls.__name__} "
        f"needs {name!r}: pass config= (a diffusers folder or Hub id of the same family, whose tokenizer files "
        f"are read) or {name}=...")


_OMIT = object()  # leave the argument out, so the pipeline's own default applies


def _default_component(name, family, cls, required, ldm):
    if name == "scheduler":
        class_name, config = families.SCHEDULER[family.name]
        if ldm is not None:
            config = {**config, **ldm_config.scheduler(ldm)}
        return registry.get("scheduler", class_name).from_config(config)
    if name.startswith("tokenizer") and _encoder_of(name) in family.text_encoders:
        raise _no_tokenizer(cls, name)
    if name in families.SETTINGS.get(family.name, {}):
        return families.SETTINGS[family.name][name]
    if name == "requires_safety_checker":
        return False  # no safety checker comes from a single file
    if name in required:
        if name not in cls._optional_components:
            raise SingleFileError(f"{cls.__name__} needs {name!r}, which a single file does not hold; "
                                  f"pass {name}=...")
        return None
    return _OMIT


# -- models ---------------------------------------------------------------------------------------------------

def load_model(cls, source, config=None, original_config=None, subfolder=None, torch_dtype=None,
               allow_pickle=False, **kwargs):
    hub_kwargs = hub.split_hub_kwargs(kwargs)
    ldm = _original(config, original_config)
    if kwargs:
        raise TypeError(f"{cls.__name__}.from_single_file got unexpected arguments {sorted(kwargs)}")
    name = _MODEL_COMPONENT.get(cls.__name__)
    if name is None:
        raise SingleFileError(f"{cls.__name__} has no single-file layout; from_single_file serves "
                              f"{', '.join(_MODEL_COMPONENT)} and the Stable Diffusion pipelines")
    tensors = read_checkpoint(source, allow_pickle, **hub_kwargs)
    prefix = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "controlnet": CONTROLNET_PREFIX}[name]
    if not any(k.startswith(prefix) for k in tensors):
        prefix = ""  # a file of this model alone (a VAE, a ControlNet) has its keys at the top level
    part = {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix) and not k.startswith(families.IGNORED_PREFIXES)
            and k not in families.IGNORED_KEYS}
    root = _config_root(config, hub_kwargs)
    if root is not None:
        folder = root / subfolder if subfolder else root
        if not (folder / "config.json").is_file():
            folder = folder / name
        if not (folder / "config.json").is_file():
            raise SingleFileError(f"config={config!r} has no config.json for a {cls.__name__} (looked in "
                                  f"{root} and its {subfolder or name}/ folder)")
        model_config = cls.load_config(folder)
    else:
        if name == "controlnet" and ldm is not None:
            raise SingleFileError("original_config= describes a Stable Diffusion model, not a ControlNet; pass "
                                  "config= (a diffusers ControlNet folder) instead")
        # A VAE alone: every family shares its shape; only SDXL's scaling factor differs (pass config= for it).
        vae_alone = name == "vae" and not any("attn2.to_k" in k for k in tensors)
        family = Family("sd1") if vae_alone else families.detect(tensors)
        model_config = _model_config(cls, None, name, family, ldm)
    if name == "controlnet" and "conditioning_channels" not in model_config:
        hint = part.get("input_hint_block.0.weight")
        if hint is not None:
            model_config["conditioning_channels"] = hint.shape[1]
    return build_diffloom_model(cls, model_config, name, part, as_dtype(torch_dtype), f"{source} ({name})")


# -- writing --------------------------------------------------------------------------------------------------

def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoders in the original single-file layout."""
    components = pipe._components
    text, text_2 = components.get("text_encoder"), components.get("text_encoder_2")
    if text_2 is not None:
        layout = {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
                  "text_encoder_2": ("conditioner.embedders.1.model.", "openclip")} if text is not None \
            else {"text_encoder_2": ("conditioner.embedders.0.model.", "openclip")}
    elif text is not None:
        # OpenAI's CLIP (SD 1) uses quick GELU; the OpenCLIP towers of SD 2 use exact GELU.
        openai = text.config.hidden_act == "quick_gelu"
        layout = {"text_encoder": ("cond_stage_model.transformer.", "clip") if openai
                  else ("cond_stage_model.model.", "openclip")}
    else:
        layout = {}
    out = {}
    for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        if components.get(name) is None:
            raise SingleFileError(f"{type(pipe).__name__} has no {name}; a single file needs one")
        for key, value in keys.model_to_original(name, components[name].state_dict()).items():
            out[prefix + key] = value
    for name, (prefix, style) in layout.items():
        state = components[name].state_dict()
        converted = keys.clip_to_original(state) if style == "clip" else keys.openclip_to_original(state)
        out.update({prefix + k: v for k, v in converted.items()})
    return out


def save_single_file(pipe, path):
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: save_single_file writes safetensors; give the file a .safetensors name")
    if path.is_dir():
        raise SingleFileError(f"{path} is a folder; save_single_file writes one file")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in original_state_dict(pipe).items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return path


class SingleFile:
    """The provider the core delegates to: ``Pipeline.from_single_file``, ``Model.from_single_file`` and
    ``pipe.save_single_file``."""

    def __init__(self, pipe):
        self.pipe = pipe

    def save_single_file(self, path):
        """Write the UNet, VAE and text encoder(s) as one ``.safetensors`` file in the original layout."""
        return save_single_file(self.pipe, path)

    @staticmethod
    def from_single_file(cls, path_or_url, **kwargs):
        if isinstance(cls, type) and issubclass(cls, ModelMixin):
            return load_model(cls, path_or_url, **kwargs)
        if isinstance(cls, type) and issubclass(cls, DiffusionPipeline):
            return load_pipeline(cls, path_or_url, **kwargs)
        raise SingleFileError(f"{cls!r} is neither a diffloom pipeline nor a model class")
