"""``from_single_file`` and ``save_single_file``: one checkpoint file in the original Stable Diffusion layout.

Reading: the file's keys tell the family (:mod:`.families`); each component's keys are cut out by prefix,
renamed (:mod:`.keys`) and assigned into a model built on the meta device. A model's config comes from
``original_config=`` (the training .yaml), or from ``config=`` (a diffusers folder or Hub id, of which only config
and tokenizer files are read), or else from the family's known config; the settings diffusers' loader takes as
keyword arguments (``num_in_channels``, ``image_size``, ``upcast_attention``, ``scaling_factor``,
``prediction_type``, ``scheduler_type``, ``extract_ema``, ``load_safety_checker``) adjust it. Writing: the
reverse, from the pipeline's components.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from diffloom import hub
from diffloom.configuration import init_keys, read_json
from diffloom.modeling import ModelMixin, as_dtype, load_pickle, load_safetensors
from diffloom.pipeline import DiffusionPipeline, init_parameters, load_component, resolve_class
from diffloom.registry import registry

from . import families, keys, original_config as ldm_config
from .families import CONTROLNET_PREFIX, EMA_PREFIX, UNET_PREFIX, VAE_PREFIX, DetectionError, Family

logger = logging.getLogger(__name__)


class SingleFileError(ValueError):
    """A single file, or a request about one, that cannot be served; says what would fix it."""


_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# huggingface.co (or hf.co) file URLs: owner/repo, then blob/<rev>/ or resolve/<rev>/ (optional), then the path.
_HUB_URL = re.compile(r"https://(?:huggingface\.co|hf\.co)/([^/]+/[^/]+)/(?:(?:blob|resolve)/([^/]+)/)?(.+)")
# Pipeline components whose weights a single file carries; model class -> its component name.
_FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet")
_MODEL_COMPONENT = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "ControlNetModel": "controlnet"}
# Where a model's keys sit in a full checkpoint; a file of that model alone has them at the top level.
_PREFIXES = {"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX, "vae."), "controlnet": (CONTROLNET_PREFIX,)}
SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"


@dataclass
class Options:
    """The keyword arguments of diffusers' single-file loader that are settings rather than components."""

    extract_ema: bool = False  # read the UNet's EMA copy (model_ema.*) instead of its training weights
    num_in_channels: int | None = None  # the UNet's in_channels
    image_size: int | None = None  # the training resolution: the VAE's sample_size, and the UNet's in latents
    upcast_attention: bool | None = None  # the UNet's
    scaling_factor: float | None = None  # the VAE's latent scale
    prediction_type: str | None = None  # the scheduler's
    scheduler_type: str | None = None  # the scheduler class, by the original conversion script's names
    load_safety_checker: bool = False  # fetch the CompVis safety checker and its image processor

    @classmethod
    def take(cls, kwargs: dict, allowed, caller: str) -> Options:
        options = {f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs}
        refused = sorted(set(options) - set(allowed))
        if refused:
            raise TypeError(f"{caller} does not take {refused}, which set{'' if len(refused) > 1 else 's'} another "
                            f"component: pass {'them' if len(refused) > 1 else 'it'} to a pipeline's from_single_file")
        return cls(**options)


_MODEL_OPTIONS = {"unet": ("extract_ema", "num_in_channels", "image_size", "upcast_attention"),
                  "vae": ("image_size", "scaling_factor"), "controlnet": ()}
# config key -> the option that sets it, per model
_MODEL_SETTINGS = {"unet": {"in_channels": "num_in_channels", "upcast_attention": "upcast_attention"},
                   "vae": {"scaling_factor": "scaling_factor"}, "controlnet": {}}


def _dtype(torch_dtype, dtype):
    """diffusers takes dtype= as well as torch_dtype=; dtype wins."""
    return as_dtype(dtype if dtype is not None else torch_dtype)


# -- reading the file ---------------------------------------------------------------------------------------

def read_checkpoint(source, allow_pickle=False, **hub_kwargs) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, a local file or a ``https://huggingface.co/owner/repo/blob/rev/file`` URL.
    Training checkpoints nest their weights under "state_dict" beside counters (global_step...), dropped here."""
    if isinstance(source, dict):
        tensors = source
    else:
        path = _local_path(source, hub_kwargs)
        if path.suffix in _PICKLE_SUFFIXES:
            tensors = load_pickle(path, allow_pickle)
        elif path.suffix == ".safetensors":
            tensors = load_safetensors(path)
        else:
            raise SingleFileError(f"{path}: unknown file type {path.suffix!r}; expected .safetensors (or a pickled "
                                  f".ckpt with allow_pickle=True)")
    while isinstance(tensors.get("state_dict"), dict):
        tensors = tensors["state_dict"]
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def _local_path(source, hub_kwargs) -> Path:
    source = os.fspath(source)
    if m := _HUB_URL.fullmatch(source):
        repo, revision, filename = m.groups()
        folder, _, name = filename.rpartition("/")
        if revision is not None:
            hub_kwargs = {**hub_kwargs, "revision": revision}
        return hub.resolve_file(repo, name, folder or None, **hub_kwargs)
    if source.startswith(("http://", "https://")):
        raise SingleFileError(f"{source}: only huggingface.co file URLs are fetched; download the file and pass "
                              f"its path")
    path = Path(source)
    if not path.is_file():
        raise SingleFileError(f"{source} is not a file (from_single_file reads one .safetensors or .ckpt file; "
                              f"for a diffusers folder use from_pretrained)")
    return path


def split(tensors: dict, family: Family, source) -> dict[str, dict]:
    """{component: {key without prefix: tensor}}; a key no component claims is refused by name."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "controlnet": CONTROLNET_PREFIX,
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


def ema_unet(tensors: dict, unet: dict, source) -> dict:
    """The UNet's EMA copy. LDM's EMA stores each weight under its name with the dots removed
    (``model_ema.diffusion_modelinput_blocks00weight``); a file without one keeps its regular weights."""
    ema = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
    if not ema:
        logger.warning("%s holds no EMA weights (model_ema.*): extract_ema=True loads its regular UNet weights",
                       source)
        return unet
    out = {}
    for key in unet:
        flat = f"diffusion_model.{key}".replace(".", "")
        if flat not in ema:
            raise SingleFileError(f"{source}: extract_ema=True, but its EMA weights lack the UNet's {key} (no "
                                  f"{EMA_PREFIX}{flat}); drop extract_ema to load the regular weights")
        out[key] = ema[flat]
    return out


def _family(tensors, root) -> Family:
    """The file's family; a file without text encoders whose UNet width is no known family's (a small or unusual
    model) takes its text-encoder layout from config=, whose configs describe everything else."""
    try:
        return families.detect(tensors)
    except DetectionError:
        index = read_json(root / "model_index.json") if root is not None and (root / "model_index.json").is_file() \
            else None
        if index is None:
            raise
    named = {n for n, entry in index.items() if isinstance(entry, list) and entry[0] is not None}
    name = ("sdxl-base" if "text_encoder" in named else "sdxl-refiner") if "text_encoder_2" in named else "sd1"
    return Family(name, families.in_channels(tensors), families.TEXT_ENCODERS[name])


# -- configs ------------------------------------------------------------------------------------------------

def _config_root(config, hub_kwargs) -> Path | None:
    if config is None:
        return None
    return hub.resolve_folder(config, allow_patterns=["*.json", "*.txt", "*.model"], **hub_kwargs)


def _index_entry(root, name):
    if root is None or not (root / "model_index.json").is_file():
        return None
    return read_json(root / "model_index.json").get(name)


def _config_folder(root: Path, name: str, subfolder=None) -> Path | None:
    """The folder of a model's config.json under config=: the given subfolder, the root itself (a model folder)
    or the component's folder of a pipeline."""
    for folder in ((root / subfolder,) if subfolder else (root, root / name)):
        if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
            return folder
    return None


def latent_scale(root, ldm, vae=None) -> int:
    """Image pixels per latent pixel, which turns an image_size into the UNet's sample_size."""
    if ldm is not None:
        return ldm_config.latent_scale(ldm)
    if vae is None and root is not None and (root / "vae" / "config.json").is_file():
        vae = read_json(root / "vae" / "config.json")
    widths = (vae or families.VAE["sd1"])["block_out_channels"]
    return 2 ** (len(widths) - 1)


def model_config(kind, model_cls, family, root, ldm, options, vae=None, subfolder=None, unet_config=None) -> dict:
    """The config of the file's UNet, VAE or ControlNet, with the caller's settings applied (``vae``: the config of
    the VAE the UNet works with, where the caller passed one)."""
    if ldm is not None:
        image_size = options.image_size or family.image_size
        config = {"unet": lambda: ldm_config.unet(ldm, image_size), "vae": lambda: ldm_config.vae(ldm, image_size),
                  "controlnet": lambda: ldm_config.controlnet(ldm)}[kind]()
    elif root is not None and (folder := _config_folder(root, kind, subfolder)) is not None:
        config = model_cls.load_config(folder)
    elif root is not None and subfolder:
        raise SingleFileError(f"config={os.fspath(root)!r} has no {subfolder}/config.json for a "
                              f"{model_cls.__name__}; check subfolder=")
    elif kind == "controlnet":
        # A ControlNet copies its UNet's encoder: the UNet's config, without the decoder's settings.
        allowed = init_keys(model_cls)
        config = {k: v for k, v in (unet_config or families.unet_config(family)).items() if k in allowed}
    else:
        config = dict(families.VAE[family.name] if kind == "vae" else families.unet_config(family))
    if options.image_size is not None and kind == "unet":
        config["sample_size"] = options.image_size // latent_scale(root, ldm, vae)
    elif options.image_size is not None and kind == "vae":
        config["sample_size"] = options.image_size
    for key, option in _MODEL_SETTINGS[kind].items():
        if getattr(options, option) is not None:
            config[key] = getattr(options, option)
    return config


def _original(config, original_config):
    if original_config is None:
        return None
    if config is not None:
        raise SingleFileError("pass config= (a diffusers folder) or original_config= (the training .yaml), not "
                              "both: each describes the whole model")
    return ldm_config.read(original_config)


# -- building models ------------------------------------------------------------------------------------------

def _cast(value, dtype, target):
    return value.to(dtype or target.dtype) if value.is_floating_point() else value


def build_diffloom_model(cls, config: dict, kind: str, tensors: dict, dtype, where: str):
    """A diffloom UNet/ControlNet/VAE from its config and its tensors (LDM-named, or already in diffusers' names)."""
    if kind == "controlnet" and "conditioning_channels" not in config and "input_hint_block.0.weight" in tensors:
        config = {**config, "conditioning_channels": tensors["input_hint_block.0.weight"].shape[1]}
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


# -- pipelines ------------------------------------------------------------------------------------------------

class _PipelineLoad:
    """One ``Pipeline.from_single_file`` call: the file's parts and where each component's config comes from."""

    def __init__(self, cls, source, tensors, family, root, ldm, options, dtype, hub_kwargs, given):
        self.cls, self.source, self.tensors, self.family = cls, source, tensors, family
        self.parts = split(tensors, family, source)
        self.root, self.ldm, self.options, self.dtype = root, ldm, options, dtype
        self.hub_kwargs, self.given = hub_kwargs, given
        unet = given.get("unet")
        self.unet_config = dict(unet.config) if unet is not None else None

    def file_component(self, name, required):
        entry = _index_entry(self.root, name)
        prefix = _prefix_of(name, self.family)
        if name not in self.parts:
            # Expected where config='s index names it, or else where the family has it.
            if isinstance(entry, list):
                expected = entry[0] is not None
            else:
                expected = name in ("unet", "vae") or name in self.family.text_encoders
            if expected or (name in required and name not in self.cls._optional_components):
                raise SingleFileError(f"{self.source} holds no {name} weights (keys under {prefix}), which "
                                      f"{self.cls.__name__} needs; pass {name}=...")
            return None
        where = f"{self.source} ({name}: keys under {prefix})"
        if name in ("unet", "vae", "controlnet"):
            return self.model(name, where)
        class_name = entry[1] if isinstance(entry, list) and entry[1] else families.TEXT[self.family.name][name][0]
        config = _text_config(self.root, name, self.family)
        return build_text_encoder(class_name, config, self.family.text_encoders[name][1], self.parts[name],
                                  self.dtype, where)

    def model(self, name, where):
        cls = registry.get("model", {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL",
                                     "controlnet": "ControlNetModel"}[name])
        given_vae = self.given.get("vae")
        config = model_config(name, cls, self.family, self.root, self.ldm if name != "controlnet" else None,
                              self.options, dict(given_vae.config) if given_vae is not None else None,
                              unet_config=self.unet_config)
        if name == "unet":
            self.unet_config = config
        part = self.parts[name]
        if name == "unet" and self.options.extract_ema:
            part = ema_unet(self.tensors, part, self.source)
        return build_diffloom_model(cls, config, name, part, self.dtype, where)

    def scheduler(self, entry):
        options, ldm = self.options, self.ldm
        named = isinstance(entry, list) and entry[0] is not None
        if options.prediction_type is None and options.scheduler_type is None:
            if named:
                return load_component(self.root, "scheduler", entry[0], entry[1], None, None, None, False,
                                      self.root / "model_index.json")
            class_name, config = families.SCHEDULER[self.family.name]
            config = {**config, **(ldm_config.scheduler(ldm) if ldm is not None else {})}
            return registry.get("scheduler", class_name).from_config(config)
        # Like diffusers' loader, either setting rebuilds the scheduler from the training schedule (the original
        # config's, or Stable Diffusion's) rather than adjusting config='s.
        class_name = entry[1] if named else families.SCHEDULER[self.family.name][0]
        config = dict(families.SCHEDULER_TRAINING)
        if ldm is not None:
            config.update(ldm_config.scheduler(ldm))
        else:
            config["prediction_type"] = self.family.prediction_type
        if options.prediction_type is not None:
            config["prediction_type"] = options.prediction_type
        if options.scheduler_type is not None:
            if options.scheduler_type not in families.SCHEDULER_TYPES:
                raise SingleFileError(f"scheduler_type={options.scheduler_type!r} is not one of "
                                      f"{sorted(families.SCHEDULER_TYPES)}; or pass scheduler= (an instance)")
            class_name = families.SCHEDULER_TYPES[options.scheduler_type]
        return registry.get("scheduler", class_name).from_config(config)

    def safety_checker(self):
        """The safety checker and its image processor, from the Hub repo diffusers' loader fetches them from."""
        from transformers import AutoImageProcessor

        folder = hub.resolve_folder(SAFETY_CHECKER_REPO, allow_patterns=["*.json", "*.safetensors"],
                                    **self.hub_kwargs)
        checker = registry.get("model", "StableDiffusionSafetyChecker").from_pretrained(folder, use_safetensors=True)
        if self.dtype is not None:
            checker.to(self.dtype)
        return checker.eval(), AutoImageProcessor.from_pretrained(folder)


def load_pipeline(cls, source, config=None, original_config=None, torch_dtype=None, dtype=None, allow_pickle=False,
                  **kwargs):
    hub_kwargs = hub.split_hub_kwargs(kwargs)
    options = Options.take(kwargs, [f.name for f in fields(Options)], f"{cls.__name__}.from_single_file")
    dtype = _dtype(torch_dtype, dtype)
    ldm = _original(config, original_config)
    tensors = read_checkpoint(source, allow_pickle, **hub_kwargs)
    root = _config_root(config, hub_kwargs)
    family = _family(tensors, root)
    if cls is DiffusionPipeline:
        class_name = (_index_entry(root, "_class_name") if root is not None else None) or family.pipeline
        cls = registry.get("pipeline", class_name)
    where = source if not isinstance(source, dict) else "the state dict"
    load = _PipelineLoad(cls, where, tensors, family, root, ldm, options, dtype, hub_kwargs, kwargs)
    parts = load.parts
    required, optional = init_parameters(cls)
    if options.scheduler_type is not None and "scheduler" in kwargs:
        raise SingleFileError("pass scheduler= (an instance) or scheduler_type=, not both")
    if options.load_safety_checker and "safety_checker" not in required + optional:
        raise SingleFileError(f"{cls.__name__} has no safety checker; drop load_safety_checker")
    if options.load_safety_checker and ("safety_checker" in kwargs or "feature_extractor" in kwargs):
        raise SingleFileError("load_safety_checker=True fetches the safety checker and its feature extractor; pass "
                              "them yourself (safety_checker=, feature_extractor=) or set it, not both")
    for name in required + optional:
        # Checked first: a missing tokenizer is the usual mistake, and no amount of weights fixes it.
        if name.startswith("tokenizer") and name not in kwargs and _index_entry(root, name) is None \
                and _encoder_of(name) in parts:
            raise _no_tokenizer(cls, name)
    if "controlnet" in parts and "controlnet" not in required + optional:
        logger.warning("%s also holds a ControlNet (keys under %s), which %s does not take: it is not loaded (a "
                       "ControlNet pipeline or ControlNetModel.from_single_file reads it)", where, CONTROLNET_PREFIX,
                       cls.__name__)
    checker = load.safety_checker() if options.load_safety_checker else None
    components = {}
    # The UNet before the ControlNet, whose default config is the UNet's.
    for name in sorted(required + optional, key=lambda n: n == "controlnet"):
        if name in kwargs:
            components[name] = kwargs.pop(name)
        elif checker is not None and name in ("safety_checker", "feature_extractor"):
            components[name] = checker[0] if name == "safety_checker" else checker[1]
        elif name in _FILE_COMPONENTS:
            components[name] = load.file_component(name, required)
        elif name == "scheduler":
            components[name] = load.scheduler(_index_entry(root, name))
        else:
            entry = _index_entry(root, name)
            if isinstance(entry, (list, tuple)) and entry[0] is not None and not _has_weights(root, name, entry):
                components[name] = load_component(root, name, entry[0], entry[1], None, None, None, False,
                                                   root / "model_index.json")
            elif entry is not None and not isinstance(entry, (list, tuple)):
                components[name] = entry  # a plain setting such as requires_safety_checker
            else:
                value = _default_component(name, family, cls, required)
                if value is not _OMIT:
                    components[name] = value
    if kwargs:
        raise TypeError(f"{cls.__name__}.from_single_file got unexpected arguments {sorted(kwargs)}; its "
                        f"components are {required + optional}")
    pipe = cls(**components)
    pipe.register_to_config(_name_or_path=os.fspath(source) if not isinstance(source, dict) else None)
    return pipe


def _has_weights(root, name, entry) -> bool:
    """Models other than the file's (safety checker, image encoder) are not read from config=: only its config
    and tokenizer files are, so a Hub id costs no weight download."""
    return issubclass(resolve_class(entry[0], entry[1], f"{root} entry {name!r}"), torch.nn.Module)


def _encoder_of(tokenizer_name: str) -> str:
    return tokenizer_name.replace("tokenizer", "text_encoder")


def _prefix_of(name, family) -> str:
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "controlnet": CONTROLNET_PREFIX}.get(name) \
        or family.text_encoders.get(name, ("conditioner.embedders.*", None))[0]


def _no_tokenizer(cls, name) -> SingleFileError:
    return SingleFileError(
        f"a single file holds no tokenizer (its vocabulary files are not in the checkpoint), and {cls.__name__} "
        f"needs {name!r}: pass config= (a diffusers folder or Hub id of the same family, whose tokenizer files "
        f"are read) or {name}=...")


_OMIT = object()  # leave the argument out, so the pipeline's own default applies


def _default_component(name, family, cls, required):
    if name.startswith("tokenizer") and _encoder_of(name) in family.text_encoders:
        raise _no_tokenizer(cls, name)
    if name in families.SETTINGS.get(family.name, {}):
        return families.SETTINGS[family.name][name]
    if name in required:
        if name not in cls._optional_components:
            raise SingleFileError(f"{cls.__name__} needs {name!r}, which a single file does not hold; "
                                  f"pass {name}=...")
        return None
    return _OMIT


# -- models ---------------------------------------------------------------------------------------------------

def load_model(cls, source, config=None, original_config=None, subfolder=None, torch_dtype=None, dtype=None,
               allow_pickle=False, **kwargs):
    hub_kwargs = hub.split_hub_kwargs(kwargs)
    name = _MODEL_COMPONENT.get(cls.__name__)
    if name is None:
        raise SingleFileError(f"{cls.__name__} has no single-file layout; from_single_file serves "
                              f"{', '.join(_MODEL_COMPONENT)} and the Stable Diffusion pipelines")
    caller = f"{cls.__name__}.from_single_file"
    options = Options.take(kwargs, _MODEL_OPTIONS[name], caller)
    # Like diffusers, any setting of the model's config may be passed to override the config's.
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in init_keys(cls)}
    if kwargs:
        raise TypeError(f"{caller} got unexpected arguments {sorted(kwargs)}")
    ldm = _original(config, original_config)
    tensors = read_checkpoint(source, allow_pickle, **hub_kwargs)
    where = f"{source if not isinstance(source, dict) else 'the state dict'} ({name})"
    prefix = next((p for p in _PREFIXES[name] if any(k.startswith(p) for k in tensors)), "")
    part = {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix) and not k.startswith(families.IGNORED_PREFIXES)
            and k not in families.IGNORED_KEYS}
    if name == "unet" and options.extract_ema:
        part = ema_unet(tensors, part, where)
    root = _config_root(config, hub_kwargs)
    if root is not None:
        family = None  # config= describes the whole model
        if _config_folder(root, name, subfolder) is None:
            raise SingleFileError(f"config={config!r} has no config.json for a {cls.__name__} (looked in {root}"
                                  f"{f'/{subfolder}' if subfolder else f' and its {name}/ folder'})")
    elif name == "vae":
        # A VAE alone: every family shares its shape; only SDXL's scaling factor differs (pass config= for it).
        vae_alone = not any("attn2.to_k" in k for k in tensors)
        family = Family("sd1") if vae_alone else families.detect(tensors)
    elif ldm is not None:
        try:
            family = families.detect(tensors)
        except DetectionError:
            family = Family("sd1")  # only its training resolution is used: the common 512
    else:
        family = families.detect(tensors)
    model_cfg = model_config(name, cls, family, root, ldm, options, subfolder=subfolder)
    model_cfg.update(overrides)
    return build_diffloom_model(cls, model_cfg, name, part, _dtype(torch_dtype, dtype), where)


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
