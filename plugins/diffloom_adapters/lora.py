"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on a pipeline's models.

A LoRA adds a low-rank update to a linear or convolution layer: ``y = W x + s * B(A(x))`` with ``A`` the "down"
projection (rank ``r``), ``B`` the "up" projection (optionally with a bias) and ``s`` the adapter's scale. DoRA
(Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") also stores a magnitude ``m`` per output channel and
uses ``W' = m * (W + s B A) / ||W + s B A||``, the norm taken over each output channel's row.
Nothing in the model is replaced: each targeted ``nn.Linear`` / ``nn.Conv2d`` gets one torch forward hook that
adds the updates of the active adapters to the layer's output. Removing the hook restores the layer exactly.

The scale ``s`` is ``alpha / r`` per layer: ``alpha`` from a kohya file's ``.alpha`` keys, or ``r`` and
``lora_alpha`` (with their per-layer patterns, and ``alpha / sqrt(r)`` for rsLoRA) from the ``lora_adapter_metadata``
diffusers writes into safetensors files; 1 when the file has neither. It is multiplied by the adapter's weight
from ``set_adapters`` (1 by default, possibly one per UNet block) and by the running call's
``cross_attention_kwargs["scale"]`` (read from the call of this thread, so two threads can use different scales).

As in diffusers (PEFT), each model has its own active adapters: loading one activates it in the models it has
layers for and leaves the others as they were; ``set_adapters`` sets them everywhere. ``fuse_lora`` adds the
updates into the weights themselves (a layer holding fused updates then runs as a plain layer, and the call scale
no longer applies) and keeps the original weights, so ``unfuse_lora`` restores them bit for bit. An adapter deleted
while fused stays in the weights, and ``unload_lora_weights`` keeps fused updates (that is how a LoRA is baked in).

Key formats read, the way diffusers reads them (what it leaves unread is reported in a warning and skipped):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias``, DoRA's
  ``lora_magnitude_vector``), ``text_encoder.`` / ``text_encoder_2.`` for the text encoders (the text encoder of a
  pipeline without that component is skipped). The UNet also reads ``.lora.down/up.weight`` and the old
  attention-processor spelling ``attn1.processor.to_q_lora.down.weight``; the text encoders read
  ``.lora_linear_layer.down/up.weight``, ``self_attn.to_q_lora.down.weight`` and ``text_projection.lora.down``.
* kohya / A1111 / LyCORIS LoCon: every key starts with ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` / ``lora_te2_``
  for SDXL's two text encoders), with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; 3x3 convolutions
  take a 3x3 ``lora_down``. SDXL pipelines also read the original (SGM) UNet's names (``input_blocks_4_1_...``);
  kohya DoRA's ``dora_scale`` is dropped, as diffusers drops it.

Where diffloom departs from diffusers on purpose: a scale never outlives what it was given for. diffusers keeps
PEFT's layer scales as mutable state, so ``fuse_lora(lora_scale=s)`` leaves the active adapters at ``s`` after
``unfuse_lora``, a call at ``cross_attention_kwargs={"scale": 0}`` resets the ``set_adapters`` weights, and the next
``load_lora_weights`` scales the new adapter's text encoder layers by the last call's scale; here the call scale
belongs to its call (threads share a pipeline) and ``unfuse_lora`` restores the weights exactly. A key naming no
layer of a model raises (diffusers skips it while at least one key matches), and kohya alphas apply per layer
(where they differ, diffusers 0.42 gives UNet attention layers and text encoder layers the file's most common one).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffloom.loop import current_call

from .files import read_weights

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_DEFAULT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry: the PEFT LoraConfig per model
_LOAD_OPTIONS = ("weight_name", "subfolder", "allow_pickle", "use_safetensors", "low_cpu_mem_usage", "revision",
                 "cache_dir", "local_files_only", "token", "force_download", "proxies")
_HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies")

# diffusers-format spellings: (suffix, role, spelling). The UNet reads "peft", "lora" and "old"; the text encoders
# "peft", "linear_layer", "old" and "lora" for text_projection only.
_SPELLINGS = ((".lora_A.weight", "down", "peft"), (".lora_B.weight", "up", "peft"), (".lora_B.bias", "up_bias", "peft"),
              (".lora_magnitude_vector", "magnitude", "peft"), (".lora.down.weight", "down", "lora"),
              (".lora.up.weight", "up", "lora"), (".lora_linear_layer.down.weight", "down", "linear_layer"),
              (".lora_linear_layer.up.weight", "up", "linear_layer"))
# diffusers' first format named attention projections through the processor: attn1.processor.to_q_lora.down.weight
_OLD_PROJECTION = re.compile(r"^(.*)\.to_(q|k|v|out)_lora\.(down|up)\.weight$")

_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# kohya names are module paths with "." turned into "_"; diffusers turns them back only for the words below, so a
# UNet layer whose path has any other word with "_" in it (add_embedding.linear_1) is not read.
_KOHYA_UNET_WORDS = {"down_blocks", "mid_block", "up_blocks", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                     "proj_in", "proj_out", "time_emb_proj", "conv_in", "conv_out", "conv_shortcut"}
_KOHYA_UNET_PATHS = {"time_embedding.linear_1", "time_embedding.linear_2"}
# The original (SGM/LDM) UNet's names for layers outside its blocks, and for a resnet's layers.
_SGM_TOP_LEVEL = {"time_embed_0": "time_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
                  "label_emb_0_0": "add_embedding.linear_1", "label_emb_0_2": "add_embedding.linear_2",
                  "input_blocks_0_0": "conv_in", "out_2": "conv_out"}
_SGM_LAYERS = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut", "op": "conv"}
_SGM_WORDS = re.compile("input_blocks|middle_block|output_blocks")
_DIFFUSERS_BLOCK_WORDS = re.compile("down_blocks|mid_block|up_blocks")
_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$|^middle_block_(\d+)_(.+)$")


@dataclass
class LoraLayer:
    """One adapter's update of one layer."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank
    up_bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None  # DoRA: the norm each output channel's weight row should have

    def update(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``B(A(x))``, the up projection's bias included."""
        if isinstance(module, nn.Conv2d):
            hidden = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
            return F.conv2d(hidden, self.up, self.up_bias)
        return F.linear(F.linear(x, self.down), self.up, self.up_bias)

    def delta_weight(self) -> torch.Tensor:
        """``B @ A`` in the layer's weight shape, computed in float32 (half-precision matmuls are slow on CPUs)."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 4:
            return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        return up @ down

    def dora_factor(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """DoRA's ``m / ||W + s B A||``, one factor per output channel; the norm is a constant, not learned."""
        merged = weight + (self.delta_weight() * strength).to(weight.dtype)
        return (self.magnitude.flatten() / merged.flatten(1).norm(dim=1)).detach()

    def add_to_output(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor, strength: float):
        if self.magnitude is None:
            return output + self.update(module, x) * strength
        factor = self.dora_factor(module.weight.to(x.dtype), strength)
        if isinstance(module, nn.Conv2d):
            factor = factor.view(1, -1, 1, 1)
        bias = module.bias
        # ``output`` may already hold other adapters' updates; DoRA rescales all of it except the bias.
        without_bias = output if bias is None else output - (bias.view(1, -1, 1, 1) if factor.ndim == 4 else bias)
        return output + (factor - 1) * without_bias + factor * self.update(module, x) * strength

    def fused_weight(self, weight: torch.Tensor, unfused: torch.Tensor, strength: float) -> torch.Tensor:
        """``weight`` with this update added (DoRA: added, then each row rescaled; the norm is the one of the
        weight before any fusing, as when the adapter runs unfused)."""
        delta = (self.delta_weight() * strength).to(weight.dtype)
        if self.magnitude is None:
            return weight + delta
        factor = self.dora_factor(unfused, strength).to(weight.dtype)
        return factor.view(-1, *[1] * (weight.ndim - 1)) * (weight + delta)


class LoraAdapter:
    """The LoRA methods of one pipeline (``pipe.load_lora_weights`` and friends)."""

    def __init__(self, pipe):
        self.pipe = pipe
        # adapter name -> component -> module path -> layer
        self.adapters: dict[str, dict[str, dict[str, LoraLayer]]] = {}
        self.weights: dict[str, dict] = {}  # adapter name -> {"unet": float | per-block dict, "text_encoder": ...}
        self.active: dict[str, list[str]] = {}  # component -> its active adapters
        self.enabled = True
        # Every layer an adapter targets, with its forward hook while it has one (see _sync_hooks).
        self._hooks: dict[tuple[str, str], tuple[nn.Module, torch.utils.hooks.RemovableHandle | None]] = {}
        # Fusing: the weight (and bias) of each layer before fusing, and the adapters fused into it with the
        # strength they were fused at; an adapter deleted while fused stays in the latter to be baked in again.
        self._originals: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, torch.Tensor | None]] = {}
        self._fused: dict[tuple[str, str], dict[str, tuple[LoraLayer, float]]] = {}
        # Models that have held LoRA layers since the last unload: diffusers keeps their (maybe empty) LoRA
        # wrappers, which decide what get_active_adapters reports.
        self._touched: set[str] = set()

    def _loadable(self) -> list[str]:
        """The models this pipeline loads LoRA into (SD: unet, text_encoder; SDXL also text_encoder_2)."""
        return [name for name in LORA_COMPONENTS if hasattr(self.pipe, name)]

    # -- loading -------------------------------------------------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        """Load a LoRA file (or state dict) as adapter ``adapter_name`` and make it the active adapter of the models
        it has layers for. ``hotswap=True`` replaces the UNet layers of the loaded adapter ``adapter_name``."""
        _warn_ignored("load_lora_weights", {k: v for k, v in kwargs.items() if k not in _LOAD_OPTIONS})
        hub_kwargs = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
        if hotswap and adapter_name not in self.adapters:
            raise ValueError(f"hotswap=True replaces a loaded adapter, and none is named {adapter_name!r}; pass the "
                             f"adapter_name of one of {sorted(self.adapters) or 'none loaded'}, or hotswap=False")
        if adapter_name is None:
            adapter_name = f"default_{len(self.adapters)}"
        if adapter_name in self.adapters and not hotswap:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name= or "
                             f"delete_adapters({adapter_name!r}) first")
        source = pretrained_model_name_or_path_or_dict
        state_dict, metadata = read_weights(source, kwargs.get("weight_name"), _DEFAULT_FILES,
                                            subfolder=kwargs.get("subfolder"),
                                            allow_pickle=kwargs.get("allow_pickle", False),
                                            use_safetensors=kwargs.get("use_safetensors"), guess=True,
                                            with_metadata=True, what="LoRA", **hub_kwargs)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{source} holds a {type(state_dict).__name__}, not a LoRA state dict")
        reader = LoraReader(self, _metadata_configs(metadata, source), copy=isinstance(source, dict))
        layers = reader.read(state_dict)
        if hotswap:
            self._hotswap(adapter_name, layers)
            return
        if not layers:
            return  # nothing of this file is for this pipeline's models (diffusers registers no adapter either)
        self._unfuse(list(layers))  # activating the new adapter in a model unfuses that model, as PEFT does
        self.adapters[adapter_name] = layers
        self.weights[adapter_name] = {}
        for component, paths in layers.items():
            self.active[component] = [adapter_name]
            self._touched.add(component)
            for path in paths:
                self._attach(component, path, reader.module(component, path))

    def _hotswap(self, name: str, layers: dict):
        if any(component != "unet" for component in layers):
            raise ValueError("hotswap=True replaces UNet layers only, as in diffusers; this LoRA has text encoder "
                             "keys: load it without hotswap=True")
        if any(name in fused for (component, _), fused in self._fused.items() if component == "unet"):
            raise ValueError(f"hotswap=True cannot replace {name!r} while it is fused into the UNet; call "
                             f"unfuse_lora() first")
        old = self.adapters[name].get("unet", {})
        new = layers.get("unet", {})
        if set(new) - set(old):
            raise ValueError(f"hotswap=True needs the new LoRA to target the layers of {name!r}; it also targets "
                             f"{sorted(set(new) - set(old))[:4]}: load it as another adapter instead")
        self.adapters[name]["unet"] = new
        self.weights[name].pop("unet", None)  # PEFT's swap sets the scale anew, dropping the set_adapters weight
        for path in set(old) - set(new):
            self._detach_if_unused("unet", path)

    # -- the forward hook ----------------------------------------------------------------------------------------

    def _attach(self, component: str, path: str, module: nn.Module):
        if (component, path) not in self._hooks:
            self._hooks[(component, path)] = (module, None)
            self._sync_hooks([(component, path)])

    def _sync_hooks(self, keys=None):
        """A layer carries the hook only while adapters may run unfused in it. A layer holding fused updates runs
        as a plain layer, its other adapters not added (as in PEFT), and so does every layer of a disabled LoRA:
        plain layers are what CUDA graphs (the fast path) can replay, as they step aside for any torch hook."""
        for key in list(self._hooks) if keys is None else keys:
            module, handle = self._hooks[key]
            live = self.enabled and not self._fused.get(key)
            if live and handle is None:
                component, path = key

                def add_lora(module, args, output, component=component, path=path):
                    return self._apply(component, path, module, args[0], output)

                self._hooks[key] = (module, module.register_forward_hook(add_lora))
            elif not live and handle is not None:
                handle.remove()
                self._hooks[key] = (module, None)

    def _detach_if_unused(self, component: str, path: str):
        if not any(path in layers.get(component, {}) for layers in self.adapters.values()):
            handle = self._hooks.pop((component, path))[1]
            if handle is not None:
                handle.remove()

    def _apply(self, component, path, module, x, output):
        call = current_call()
        call_kwargs = getattr(call, "cross_attention_kwargs", None) if call is not None else None
        call_scale = call_kwargs.get("scale", 1.0) if call_kwargs else 1.0
        for name in self.active.get(component, ()):
            layer = self.adapters[name].get(component, {}).get(path)
            if layer is None:
                continue
            strength = layer.scale * self._weight(name, component, path) * call_scale
            if strength != 0 or layer.magnitude is not None:  # DoRA rescales the weight even with no update
                output = layer.add_to_output(module, x, output, strength)
        return output

    def _weight(self, name: str, component: str, path: str) -> float:
        weight = self.weights[name].get(component, 1.0)
        if isinstance(weight, dict):
            return unet_layer_weight(weight, path, self.pipe.unet)
        return weight

    # -- choosing adapters ---------------------------------------------------------------------------------------

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate ``adapter_names`` in every model, with weights: one number each, or a per-block dict as
        diffusers takes (``{"text_encoder": 0.5, "unet": {"down": 1.0, "mid": 0.0, "up": {"block_1": [1.0, 0.5]}}}``).
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if adapter_weights is None:
            adapter_weights = [1.0] * len(names)
        elif not isinstance(adapter_weights, list):
            adapter_weights = [adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(f"set_adapters got {len(names)} adapter names but {len(adapter_weights)} weights; pass "
                             f"one weight per adapter")
        split = {name: split_weights(1.0 if weight is None else weight, self.pipe)
                 for name, weight in zip(names, adapter_weights)}
        outside = sorted(path for component, path in self._hooks if component == "unet" and path.count(".") < 3)
        blocked = [name for name, weight in split.items() if isinstance(weight.get("unet"), dict)]
        if blocked and outside:
            raise ValueError(f"per-block UNet weights for {blocked[0]!r} cannot be spread over LoRA layers outside "
                             f"the UNet's blocks ({', '.join(outside[:4])}), and diffusers fails on them too; give "
                             f"the UNet one number, or load LoRAs without those layers")
        self.weights.update(split)
        for component in self._loadable():
            if getattr(self.pipe, component) is not None:
                self.active[component] = list(names)

    def get_active_adapters(self) -> list[str]:
        """The active adapters of the last model (UNet, text encoder, second text encoder) that holds LoRA layers:
        what diffusers reports, as the models may differ."""
        touched = [component for component in LORA_COMPONENTS if component in self._touched]
        return list(self.active.get(touched[-1], [])) if touched else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` of the models that hold LoRA layers."""
        listing: dict[str, list[str]] = {}
        for name, layers in self.adapters.items():
            for component in layers:
                listing.setdefault(component, []).append(name)
        return {component: listing[component] for component in LORA_COMPONENTS if component in listing}

    def enable_lora(self):
        self.enabled = True
        self._sync_hooks()

    def disable_lora(self):
        """Run the models without their adapters. As in diffusers, fused updates are taken out of the weights
        (and stay out after ``enable_lora``, where the active adapters run unfused)."""
        self._unfuse(self._loadable())
        self.enabled = False
        self._sync_hooks()

    def _check_names(self, names):
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ValueError(f"no LoRA adapter named {', '.join(map(repr, missing))}; loaded adapters: "
                             f"{sorted(self.adapters) or 'none'}")

    # -- fusing --------------------------------------------------------------------------------------------------

    def _check_components(self, components, method: str) -> list[str]:
        loadable = self._loadable()
        components = loadable if components is None else list(components)
        if not components:
            raise ValueError(f"{method}(components=[]) names no model; pass some of {loadable} or leave it out")
        wrong = [c for c in components if c not in loadable]
        if wrong:
            raise ValueError(f"{method}(components=...) got {wrong}, which this {type(self.pipe).__name__} loads no "
                             f"LoRA into; it takes {loadable}")
        return components

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None,
                  **kwargs):
        """Add the updates of each model's active adapters (or of ``adapter_names``), times ``lora_scale``, into the
        weights of ``components`` (by default every model the pipeline loads LoRA into)."""
        _warn_ignored("fuse_lora", kwargs)
        components = self._check_components(components, "fuse_lora")
        unknown = [n for n in adapter_names or () if n not in self.adapters]
        if unknown:
            warnings.warn(f"fuse_lora: no adapter named {unknown} is loaded; fusing the others", stacklevel=2)
        plan = {}
        for (component, path), (module, _) in self._hooks.items():
            if component not in components:
                continue
            names = self.active.get(component, []) if adapter_names is None else adapter_names
            fused = self._fused.get((component, path), {})
            todo = [(name, self.adapters[name][component][path]) for name in names if name not in fused
                    and path in self.adapters.get(name, {}).get(component, {})]
            if module.bias is None and any(layer.up_bias is not None for _, layer in todo):
                raise ValueError(f"{component}.{path} has no bias to fuse its LoRA's lora_B bias into, so fuse_lora "
                                 f"cannot fuse this adapter (nothing was fused); run it unfused")
            if todo:
                plan[(component, path)] = (module, todo)
        with torch.no_grad():
            for (component, path), (module, todo) in plan.items():
                _, unfused, _ = self._originals.get((component, path), (module, module.weight, module.bias))
                weight, bias, added = module.weight.detach(), module.bias, {}
                for name, layer in todo:
                    strength = layer.scale * self._weight(name, component, path) * lora_scale
                    weight = layer.fused_weight(weight, unfused, strength)
                    if layer.up_bias is not None:
                        bias = bias + (layer.up_bias * strength).to(bias.dtype)
                    added[name] = (layer, strength)
                if safe_fusing and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                    raise ValueError(f"fusing LoRA {sorted(added)} into {component}.{path} gives non-finite weights; "
                                     f"the adapter is broken (nothing was fused into this layer)")
                bias_before = None if module.bias is None else module.bias.detach().clone()
                self._originals.setdefault((component, path), (module, module.weight.detach().clone(), bias_before))
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
                self._fused.setdefault((component, path), {}).update(added)
        self._sync_hooks()

    def unfuse_lora(self, components=None, **kwargs):
        """Put back the weights as they were before ``fuse_lora``, exactly (updates of adapters deleted while fused
        stay, as in diffusers)."""
        _warn_ignored("unfuse_lora", kwargs)
        self._unfuse(self._check_components(components, "unfuse_lora"))

    def _unfuse(self, components):
        with torch.no_grad():
            for key in [k for k in self._originals if k[0] in components]:
                module, weight, bias = self._originals.pop(key)
                module.weight.copy_(weight)
                if bias is not None:
                    module.bias.copy_(bias)
                baked = [(layer, strength) for name, (layer, strength) in self._fused.pop(key, {}).items()
                         if key[1] not in self.adapters.get(name, {}).get(key[0], {})]
                for layer, strength in baked:  # deleted adapters diffusers cannot take out again
                    module.weight.copy_(layer.fused_weight(module.weight, weight, strength))
                    if layer.up_bias is not None:
                        module.bias.add_(layer.up_bias * strength)
        self._sync_hooks()

    # -- removing ------------------------------------------------------------------------------------------------

    def delete_adapters(self, adapter_names):
        """Remove adapters. An adapter deleted while fused stays in the weights, as in diffusers; names that are not
        loaded are skipped."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.adapters]
        if missing:
            warnings.warn(f"delete_adapters: no adapter named {missing} is loaded", stacklevel=2)
        names = [n for n in names if n in self.adapters]
        for name in names:
            del self.adapters[name]
            del self.weights[name]
        for component, active in self.active.items():
            kept = [n for n in active if n not in names]
            if not kept and active != kept:
                # As PEFT does: with every active adapter gone, the first by name of those left takes over.
                left = sorted(n for n, layers in self.adapters.items() if component in layers)
                kept = left[:1]
            self.active[component] = kept
        for component, path in [k for k in self._hooks]:
            self._detach_if_unused(component, path)

    def unload_lora_weights(self):
        """Remove every LoRA. Unfused adapters leave no trace: the models compute exactly what they did before
        loading. Fused updates stay in the weights, as in diffusers (``fuse_lora`` then ``unload_lora_weights`` is
        how a LoRA is baked in); call ``unfuse_lora`` first to drop them too."""
        for _, handle in self._hooks.values():
            if handle is not None:
                handle.remove()
        self._hooks.clear()
        self.adapters.clear()
        self.weights.clear()
        self.active.clear()
        self._originals.clear()
        self._fused.clear()
        self._touched.clear()
        self.enabled = True

    # -- saving --------------------------------------------------------------------------------------------------

    def save_lora_weights(self, save_directory, unet_lora_layers=None, text_encoder_lora_layers=None,
                          text_encoder_2_lora_layers=None, is_main_process: bool = True, weight_name: str | None = None,
                          save_function=None, safe_serialization: bool = True, unet_lora_adapter_metadata=None,
                          text_encoder_lora_adapter_metadata=None, text_encoder_2_lora_adapter_metadata=None):
        """Write LoRA state dicts (or modules) in diffusers' file layout: each key under its model's prefix
        (``unet.``), and each model's PEFT config (``*_lora_adapter_metadata``) as JSON in the safetensors metadata.
        ``is_main_process`` is accepted for diffusers' signature; like diffusers, every process writes."""
        given = {"unet": (unet_lora_layers, unet_lora_adapter_metadata),
                 "text_encoder": (text_encoder_lora_layers, text_encoder_lora_adapter_metadata),
                 "text_encoder_2": (text_encoder_2_lora_layers, text_encoder_2_lora_adapter_metadata)}
        wrong = [c for c, (layers, _) in given.items() if layers and c not in self._loadable()]
        if wrong:
            raise ValueError(f"save_lora_weights got {wrong[0]}_lora_layers, but {type(self.pipe).__name__} has no "
                             f"{wrong[0]}")
        state_dict, metadata = {}, {}
        for component, (layers, config) in given.items():
            if not layers:
                continue
            tensors = layers.state_dict() if isinstance(layers, nn.Module) else layers
            state_dict.update({f"{component}.{key}": value for key, value in tensors.items()})
            if config:
                metadata.update({f"{component}.{key}": value for key, value in config.items()})
        if not state_dict:
            raise ValueError("save_lora_weights needs at least one of unet_lora_layers, text_encoder_lora_layers "
                             "(or, for SDXL, text_encoder_2_lora_layers)")
        write_lora_file(state_dict, save_directory, weight_name, metadata or None, save_function, safe_serialization)


def _warn_ignored(method: str, kwargs: dict):
    """diffusers accepts and ignores unknown (and its deprecated, like fuse_unet=) keyword arguments; say so."""
    if kwargs:
        warnings.warn(f"{method} ignores {', '.join(sorted(kwargs))}, as diffusers does", stacklevel=3)


def write_lora_file(state_dict: dict, save_directory, weight_name=None, metadata: dict | None = None,
                    save_function=None, safe_serialization: bool = True):
    """Write a LoRA state dict as diffusers does: ``pytorch_lora_weights.safetensors`` (``.bin`` without
    safetensors) in ``save_directory``; ``metadata``, the PEFT configs, goes into the safetensors header."""
    if os.path.isfile(save_directory):
        warnings.warn(f"save_lora_weights: {save_directory} is a file, not a folder; nothing was written",
                      stacklevel=3)
        return
    if metadata and not safe_serialization:
        raise ValueError("LoRA adapter metadata can only be written into safetensors files; pass "
                         "safe_serialization=True or no *_lora_adapter_metadata")
    if save_function is None:
        if safe_serialization:
            def save_function(tensors, filename):
                from safetensors.torch import save_file

                header = {"format": "pt"}
                if metadata:
                    # JSON has no sets: PEFT configs hold target_modules as one (listed in its own order, as
                    # diffusers lists it).
                    plain = {k: list(v) if isinstance(v, set) else v for k, v in metadata.items()}
                    header[_METADATA_KEY] = json.dumps(plain, indent=2, sort_keys=True)
                save_file(tensors, filename, metadata=header)
        else:
            save_function = torch.save
    os.makedirs(save_directory, exist_ok=True)
    weight_name = weight_name or _DEFAULT_FILES[0 if safe_serialization else 1]
    save_function(state_dict, Path(save_directory, weight_name).as_posix())


# -- reading LoRA files ----------------------------------------------------------------------------------------


def _metadata_configs(metadata: dict | None, source) -> dict[str, dict] | None:
    """The PEFT config of each model from a safetensors file's ``lora_adapter_metadata`` (None if it has none)."""
    raw = (metadata or {}).get(_METADATA_KEY)
    if not raw:
        return None
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: its {_METADATA_KEY} metadata is not JSON ({e})") from None
    configs: dict[str, dict] = {component: {} for component in LORA_COMPONENTS}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if component in configs:
            configs[component][field] = value
    return configs


class LoraReader:
    """Turns a LoRA state dict into ``{component: {module path: LoraLayer}}`` for one pipeline, reading the keys as
    diffusers reads them (see the module docstring)."""

    def __init__(self, adapter: LoraAdapter, configs: dict[str, dict] | None, copy: bool):
        self.pipe = adapter.pipe
        self.copy = copy  # a caller's state dict stays the caller's: later changes to it do not reach the adapter
        self.loadable = adapter._loadable()
        self.configs = configs
        self.unread: list[str] = []  # keys diffusers skips too
        self._indexes: dict[str, tuple[dict, dict, dict]] = {}

    def read(self, state_dict: dict) -> dict[str, dict[str, LoraLayer]]:
        dora_scales = [k for k in state_dict if "dora_scale" in k]
        if dora_scales:
            warnings.warn(f"this LoRA holds kohya DoRA keys ({dora_scales[0]}, ...); like diffusers, diffloom "
                          f"drops them and loads it as a plain LoRA", stacklevel=3)
            state_dict = {k: v for k, v in state_dict.items() if "dora_scale" not in k}
        if state_dict and all(k.startswith(tuple(_KOHYA_PREFIXES)) for k in state_dict):
            parts, alphas = self._kohya(state_dict)
        else:
            parts, alphas = self._diffusers(state_dict), {}
        layers: dict[str, dict[str, LoraLayer]] = {}
        for component, found in parts.items():
            if component != "unet" and self.configs is not None:
                # transformers injects a text encoder's LoRA where its PEFT config's target_modules say (the UNet
                # takes the layers from the file), so the other layers of the file are not read
                skipped = [p for p in found if not _targeted(self.configs[component], p)]
                self.unread += [f"{component}.{p} (not in its target_modules)" for p in skipped]
                found = {p: roles for p, roles in found.items() if p not in skipped}
            if any("magnitude" in roles for roles in found.values()) and any("up_bias" in r for r in found.values()):
                raise ValueError(f"the {component} part of this LoRA has both DoRA magnitudes and lora_B biases; "
                                 f"PEFT (and so diffusers) supports no bias with DoRA")
            scales = self._scales(component, found, alphas.get(component, {}))
            for path, roles in found.items():
                layers.setdefault(component, {})[path] = self._layer(component, path, roles, scales[path])
        if self.unread:
            shown = ", ".join(self.unread[:6]) + (f" and {len(self.unread) - 6} more" if len(self.unread) > 6 else "")
            warnings.warn(f"these LoRA keys are not read (diffusers skips them too): {shown}", stacklevel=3)
        return layers

    # -- model layers --------------------------------------------------------------------------------------------

    def _index(self, component: str):
        """``(dotted name -> path, underscored name -> path, path -> module)`` of a model's linear and conv
        layers."""
        if component not in self._indexes:
            model = getattr(self.pipe, component, None)
            dotted, modules = {}, {}
            if isinstance(model, nn.Module):
                # transformers 5 CLIP text models have no ``text_model`` level, which LoRA files still name.
                alias = component != "unet" and not hasattr(model, "text_model")
                for name, module in model.named_modules():
                    if isinstance(module, (nn.Linear, nn.Conv2d)):
                        dotted[name] = name
                        modules[name] = module
                        if alias:
                            dotted["text_model." + name] = name
            underscored = {name.replace(".", "_"): path for name, path in dotted.items()}
            self._indexes[component] = (dotted, underscored, modules)
        return self._indexes[component]

    def module(self, component: str, path: str) -> nn.Module:
        return self._index(component)[2][path]

    @staticmethod
    def _raise_unknown(unknown: list[str]):
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ValueError(f"the LoRA has {len(unknown)} keys that match no linear or conv layer of this pipeline's "
                         f"unet/text encoders: {shown}")

    # -- diffusers / PEFT keys -----------------------------------------------------------------------------------

    def _diffusers(self, state_dict: dict) -> dict[str, dict[str, dict]]:
        without_lora = [k for k in state_dict if "lora" not in k]
        if without_lora:
            raise ValueError(f"{without_lora[:4]} are no LoRA keys: every key of a LoRA file names 'lora' (lora_A, "
                             f"lora_down, ...); is this a full model checkpoint or another adapter type?")
        by_component: dict[str, dict] = {}
        for key, tensor in state_dict.items():
            component, _, rest = key.partition(".")
            if component in self.loadable and rest:
                by_component.setdefault(component, {})[rest] = (key, tensor)
            else:
                self.unread.append(key)
        parts, unknown = {}, []
        for component, keys in by_component.items():
            found = self._diffusers_component(component, keys, unknown)
            if found:
                parts[component] = found
        if unknown:
            self._raise_unknown(unknown)
        return parts

    def _diffusers_component(self, component: str, keys: dict, unknown: list) -> dict[str, dict]:
        text = component != "unet"
        dotted = self._index(component)[0]
        read = []
        for rest, (key, tensor) in keys.items():
            name, role, spelling = _parse_diffusers_key(rest, text)
            readable = spelling in ({"peft", "linear_layer", "old"} if text else {"peft", "lora", "old"}) \
                or (text and spelling == "lora" and name.endswith("text_projection"))
            if readable:
                read.append((key, name, role, tensor))
            else:
                self.unread.append(key)
        if not any(role == "up" for _, _, role, _ in read):
            spelled = ("lora_A/lora_B, lora_linear_layer.down/up or self_attn.to_q_lora.down/up" if text
                       else "lora_A/lora_B, lora.down/up or attn1.processor.to_q_lora.down/up")
            raise ValueError(f"the {component} keys of this LoRA ({next(iter(keys.values()))[0]}, ...) have no up "
                             f"weight in a spelling diffusers reads for the {component} ({spelled}), so diffusers "
                             f"refuses them too; rename them to '.lora_A.weight' / '.lora_B.weight'")
        found: dict[str, dict] = {}
        for key, name, role, tensor in read:
            path = dotted.get(name)
            if path is None:
                unknown.append(key)
                continue
            if text and role == "magnitude":
                # diffusers (through transformers) does not read a text encoder's DoRA magnitudes: the layer keeps
                # the magnitude PEFT starts from, the norm of each row of its weight.
                self.unread.append(key)
                tensor = self.module(component, path).weight.detach().flatten(1).norm(dim=1)
            found.setdefault(path, {})[role] = tensor
        return found

    # -- kohya / A1111 keys --------------------------------------------------------------------------------------

    def _kohya(self, state_dict: dict):
        groups: dict[tuple[str, str], dict] = {}
        leftover = []
        for key, tensor in state_dict.items():
            prefix = next(p for p in _KOHYA_PREFIXES if key.startswith(p))
            name, _, suffix = key[len(prefix):].partition(".")
            role = _KOHYA_ROLES.get(suffix)
            if role is None:
                leftover.append(key)
            else:
                groups.setdefault((_KOHYA_PREFIXES[prefix], name), {})[role] = (key, tensor)
        for (component, name), roles in list(groups.items()):
            if "down" not in roles:  # diffusers converts a layer from its lora_down key
                leftover += [key for key, _ in roles.values()]
                del groups[(component, name)]
        if leftover:
            raise ValueError(f"the LoRA has kohya keys diffusers cannot convert: {', '.join(leftover[:6])}; only "
                             f"lora_down / lora_up / alpha (LoRA and LoCon) are read, not LoHa/LoKr/other LyCORIS")
        sgm = {name for component, name in groups if component == "unet" and _SGM_WORDS.search(name)}
        if sgm and any(_DIFFUSERS_BLOCK_WORDS.search(n) for c, n in groups if c == "unet" and n not in sgm):
            # diffusers keeps only the diffusers-named layers of a file that mixes both UNet namings
            self.unread += [key for (c, n), roles in groups.items() if c == "unet" and n in sgm
                            for key, _ in roles.values()]
            groups = {(c, n): r for (c, n), r in groups.items() if not (c == "unet" and n in sgm)}
        parts: dict[str, dict[str, dict]] = {}
        alphas: dict[str, dict[str, float]] = {}
        unknown = []
        for (component, name), roles in groups.items():
            if component not in self.loadable:
                self.unread += [key for key, _ in roles.values()]
                continue
            path, read = self._kohya_path(component, name)
            if path is None or not read:
                (unknown if path is None else self.unread).extend(key for key, _ in roles.values())
                continue
            found = parts.setdefault(component, {}).setdefault(path, {})
            for role, (_, tensor) in roles.items():
                if role == "alpha":
                    alphas.setdefault(component, {})[path] = float(tensor)
                else:
                    found[role] = tensor
        if unknown:
            self._raise_unknown(unknown)
        return parts, alphas

    def _kohya_path(self, component: str, name: str) -> tuple[str | None, bool]:
        """The module path of a kohya layer name, and whether diffusers reads that layer."""
        underscored = self._index(component)[1]
        if component != "unet":
            return underscored.get(name), True
        if name in _SGM_TOP_LEVEL:
            return self._index(component)[0].get(_SGM_TOP_LEVEL[name]), True
        match = _SGM_BLOCK.match(name)
        if match and "text_encoder_2" in self.loadable:  # diffusers maps SGM block names for SDXL pipelines only
            prefix, rest = _sgm_block(match, self.pipe.unet.config.layers_per_block)
            if prefix is None:
                return None, True
            return underscored.get(prefix.replace(".", "_") + "_" + _SGM_LAYERS.get(rest, rest)), True
        path = underscored.get(name)
        return path, path is not None and (path in _KOHYA_UNET_PATHS or all(
            "_" not in part or part in _KOHYA_UNET_WORDS for part in path.split(".")))

    # -- building layers -----------------------------------------------------------------------------------------

    def _scales(self, component: str, found: dict, alphas: dict[str, float]) -> dict[str, float]:
        """``alpha / r`` of each layer: from the file's PEFT config, its kohya alphas, or 1."""
        if self.configs is not None:
            config = self.configs[component]
            if not config.get("target_modules") and not config.get("target_parameters"):
                raise ValueError(f"the LoRA file has {_METADATA_KEY} but no PEFT config (target_modules) for its "
                                 f"{component} layers, which diffusers cannot load either; write the file with "
                                 f"{component}_lora_adapter_metadata as well, or without any metadata")
            scales = {}
            for path, roles in found.items():
                r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
                alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
                rank = roles["down"].shape[0] if "down" in roles else r
                if rank != r:
                    raise ValueError(f"the LoRA's metadata gives {component}.{path} rank {r}, but its weights have "
                                     f"rank {rank}; the file's {_METADATA_KEY} does not belong to its weights")
                scales[path] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            return scales
        # A kohya layer without its own alpha gets the most common one, as diffusers' PEFT config does.
        common = Counter(alphas.values()).most_common(1)[0][0] if alphas else None
        scales = {}
        for path, roles in found.items():
            alpha = alphas.get(path, common)
            scales[path] = 1.0 if alpha is None or "down" not in roles else alpha / roles["down"].shape[0]
        return scales

    def _layer(self, component: str, path: str, found: dict, scale: float) -> LoraLayer:
        module = self.module(component, path)
        where = f"{component}.{path}"
        if "down" not in found or "up" not in found:
            missing = "down (lora_A)" if "down" not in found else "up (lora_B)"
            raise ValueError(f"the LoRA for {where} lacks its {missing} weight")
        down, up = found["down"], found["up"]
        rank = down.shape[0]
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ValueError(f"{where} is a grouped convolution, which LoRA does not support")
            expected_down = (rank, module.in_channels, *module.kernel_size)
            expected_up = (module.out_channels, rank, 1, 1)
            expected_magnitude = (1, module.out_channels, 1, 1)
            if down.ndim == 2:  # a linear-shaped update of a 1x1 convolution
                down, up = down[:, :, None, None], up[:, :, None, None]
        else:
            expected_down, expected_up = (rank, module.in_features), (module.out_features, rank)
            expected_magnitude = (module.out_features,)
        if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
            raise ValueError(f"the LoRA for {where} has down {tuple(down.shape)} / up {tuple(up.shape)}, but the "
                             f"layer needs {expected_down} / {expected_up}: the LoRA was made for another model")
        extra = {}
        for role, shape in (("up_bias", (up.shape[0],)), ("magnitude", expected_magnitude)):
            if role in found:
                if tuple(found[role].shape) != shape:
                    raise ValueError(f"the LoRA's {role} for {where} has shape {tuple(found[role].shape)}, but the "
                                     f"layer needs {shape}")
                extra[role] = found[role]
        weight = module.weight

        def own(tensor):
            tensor = tensor.detach().to(weight.device, weight.dtype)
            return tensor.clone(memory_format=torch.contiguous_format) if self.copy else tensor.contiguous()

        return LoraLayer(own(down), own(up), scale, **{role: own(t) for role, t in extra.items()})


def _parse_diffusers_key(rest: str, text: bool) -> tuple[str | None, str | None, str | None]:
    """``(module name, role, spelling)`` of a diffusers-format key without its model prefix."""
    rest = rest.replace(".processor.", ".")
    match = _OLD_PROJECTION.match(rest)
    if match:
        attention, projection, direction = match.groups()
        if text:
            name = f"{attention}.{projection}_proj"
        else:
            name = f"{attention}.to_{projection}" + (".0" if projection == "out" else "")
        return name, direction, "old"
    for suffix, role, spelling in _SPELLINGS:
        if rest.endswith(suffix):
            name = rest[:-len(suffix)]
            if not text and role == "magnitude" and name.endswith(".to_out"):
                name += ".0"  # the old spelling's DoRA magnitude of to_out.0
            return name, role, spelling
    return None, None, None


def _sgm_block(match: re.Match, layers_per_block: int) -> tuple[str | None, str]:
    """The diffusers path of an SGM UNet block (``input_blocks_4_1`` -> ``down_blocks.1.attentions.0``) and the
    rest of the layer name."""
    kind, i, j, rest, middle, middle_rest = match.groups()
    if middle is not None:
        places = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")
        return (places[int(middle)] if int(middle) < 3 else None), middle_rest
    i, j = int(i), int(j)
    if kind == "input_blocks":
        block, layer = divmod(i - 1, layers_per_block + 1)
        if rest == "op":
            return f"down_blocks.{block}.downsamplers.0", rest
        inner = ("resnets", "attentions")[j] if j < 2 else None
        return (f"down_blocks.{block}.{inner}.{layer}" if inner else None), rest
    block, layer = divmod(i, layers_per_block + 1)
    inner = {0: f"resnets.{layer}", 1: f"attentions.{layer}", 2: "upsamplers.0"}.get(j)
    return (f"up_blocks.{block}.{inner}" if inner else None), rest


def _targeted(config: dict, path: str) -> bool:
    """Whether a PEFT config's ``target_modules`` (a regex, or names matching the end of a path) take ``path``."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets or ())


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's per-layer value: the first pattern that matches the end of ``path`` at a ``.`` boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


# -- adapter weights -------------------------------------------------------------------------------------------


def split_weights(weight, pipe) -> dict:
    """One adapter's ``set_adapters`` weight as ``{component: float | per-block dict}``; components a dict leaves
    out keep weight 1."""
    if not isinstance(weight, dict):
        return {"unet": weight, **{name: weight for name in LORA_COMPONENTS[1:]}}
    unknown = set(weight) - set(LORA_COMPONENTS)
    if unknown:
        raise ValueError(f"set_adapters weight dict has unknown keys {sorted(unknown)}; its keys are components "
                         f"('unet', 'text_encoder', 'text_encoder_2'), UNet blocks go inside 'unet'")
    split = {name: value for name, value in weight.items() if value is not None}
    if isinstance(split.get("unet"), dict):
        check_block_weights(split["unet"], pipe.unet)
    return split


def check_block_weights(blocks: dict, unet):
    """Validate a per-block weight dict against the UNet's blocks; blocks left out keep weight 1. A part (``down``,
    ``up``) takes a number, a list (one weight per transformer layer of each of its blocks, or one for all) or a
    dict of blocks; ``mid`` a number or a one-item list."""
    for part, value in blocks.items():
        if part not in ("down", "mid", "up"):
            raise ValueError(f"UNet block weights take 'down', 'mid' and 'up', not {part!r}")
        if part == "mid":
            if isinstance(value, list) and len(value) != 1:
                raise ValueError(f"the 'mid' block weight takes one number, got {len(value)}")
            if not isinstance(value[0] if isinstance(value, list) else value, (int, float)):
                raise ValueError(f"the 'mid' block weight must be a number, got {value!r}")
            continue
        part_blocks = getattr(unet, f"{part}_blocks")
        if not isinstance(value, dict):
            value = {f"block_{i}": value for i, block in enumerate(part_blocks) if getattr(block, "attentions", ())}
        for block, layers in value.items():
            index = int(block.removeprefix("block_")) if re.fullmatch(r"block_\d+", block) else None
            if index is None or index >= len(part_blocks):
                raise ValueError(f"{part!r} has blocks block_0..block_{len(part_blocks) - 1}, not {block!r}")
            n = len(getattr(part_blocks[index], "attentions", ()))
            if n == 0:
                raise ValueError(f"{part}.{block} has no transformer layers, so it takes no LoRA weight")
            if isinstance(layers, list):
                if len(layers) not in (1, n):
                    raise ValueError(f"{part}.{block} has {n} transformer layers but got {len(layers)} weights")
            elif not isinstance(layers, (int, float)):
                raise ValueError(f"the {part}.{block} weight must be a number or a list, got {layers!r}")


def unet_layer_weight(blocks: dict, path: str, unet) -> float:
    """The LoRA weight of the UNet layer ``path`` under a per-block dict, spread as diffusers spreads it: a
    transformer layer takes its own weight, another layer of a block (resnet, down/upsampler) the weight of the
    block's transformer layer of the same index (``down_blocks.0.resnets.1`` that of ``attentions.1``), and a layer
    with no such transformer layer weight 1."""
    parts = path.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4 and parts[2] != "attentions" and parts[3].isdigit():
        transformers = getattr(getattr(unet, parts[0])[int(parts[1])], "attentions", ())
        if int(parts[3]) < len(transformers):
            path = f"{parts[0]}.{parts[1]}.attentions.{parts[3]}."
    return block_weight(blocks, path)


def block_weight(blocks: dict, path: str, default: float = 1.0) -> float:
    """The weight of the UNet layer ``path`` under a per-block dict; parts and blocks the dict leaves out get
    ``default`` (1 for LoRA, 0 for IP-Adapter scales, as in diffusers).

    Only the attention (transformer) layers of a block are weighted here; the other layers of the UNet keep
    weight 1 (see :func:`unet_layer_weight` for how LoRA spreads the weights over them).
    """
    match = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.", path)
    if match:
        part, block, layer = match.group(1), int(match.group(2)), int(match.group(3))
        value = blocks.get(part, default)
        if isinstance(value, dict):
            value = value.get(f"block_{block}", default)
        if isinstance(value, list):  # one weight per transformer layer, or one for all
            return value[layer] if len(value) > 1 else value[0]
        return value
    if path.startswith("mid_block.attentions."):
        value = blocks.get("mid", default)
        return value[0] if isinstance(value, list) else value
    return 1.0
