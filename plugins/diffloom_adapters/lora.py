"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on a pipeline's models.

A LoRA adds a low-rank update to a linear or convolution layer: ``y = W x + s * B(A(x))`` with ``A`` the "down"
projection (rank ``r``), ``B`` the "up" projection and ``s = alpha / r`` (1 when the file stores no alpha).
Nothing in the model is replaced: each targeted ``nn.Linear`` / ``nn.Conv2d`` gets one torch forward hook that
adds the updates of the active adapters to the layer's output. Removing the hook restores the layer exactly.

The strength of an adapter is ``s * w * c``: ``w`` its weight from ``set_adapters`` (1 by default, possibly one
per UNet block), ``c`` the running call's ``cross_attention_kwargs["scale"]`` (read from the call of this thread,
so two threads can use different scales). ``fuse_lora`` adds ``s * w * lora_scale * B @ A`` into the weights
themselves (the call scale no longer applies to fused adapters, as in diffusers) and keeps the original
weights, so ``unfuse_lora`` restores them bit for bit (``unload_lora_weights`` keeps fused updates, as diffusers does).

Key formats read (the component comes from the prefix):

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``, ``<module>.lora.down/up.weight``,
  ``<module>.lora_linear_layer.down/up.weight``, the older ``<attn>.processor.to_q_lora.down.weight``, with
  ``text_encoder.`` / ``text_encoder_2.`` prefixes for the text encoders, optional ``<module>.alpha``;
* kohya / A1111: ``lora_unet_<module with _>``, ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL's two
  text encoders), ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffloom.loop import current_call

from .files import read_weights

_DEFAULT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_DIFFUSERS_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                       ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                       ".lora_linear_layer.up.weight": "up", ".alpha": "alpha"}
# Files saved by diffusers' old attention-processor LoRA name the projection through the processor.
_PROCESSOR_KEY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraLayer:
    """One adapter's update of one layer."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def delta_output(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            hidden = F.conv2d(x, self.down, None, module.stride, module.padding, module.dilation)
            return F.conv2d(hidden, self.up)
        return F.linear(F.linear(x, self.down), self.up)

    def delta_weight(self) -> torch.Tensor:
        if self.down.ndim == 4:
            return torch.einsum("or,rikl->oikl", self.up[:, :, 0, 0], self.down)
        return self.up @ self.down


class LoraAdapter:
    """The LoRA methods of one pipeline (``pipe.load_lora_weights`` and friends)."""

    def __init__(self, pipe):
        self.pipe = pipe
        # adapter name -> component -> module path -> layer
        self.adapters: dict[str, dict[str, dict[str, LoraLayer]]] = {}
        self.weights: dict[str, dict] = {}  # adapter name -> {"unet": float | per-block dict, "text_encoder": ...}
        self.active: list[str] = []
        self.enabled = True
        self._hooks: dict[tuple[str, str], tuple[nn.Module, torch.utils.hooks.RemovableHandle]] = {}
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # weights before fusing
        self._fused: dict[tuple[str, str], set[str]] = {}  # adapters baked into a layer's weight

    # -- loading -------------------------------------------------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, subfolder: str | None = None, allow_pickle=False,
                          **hub_kwargs):
        """Load a LoRA file (or state dict) as adapter ``adapter_name`` and make it the active adapter."""
        if adapter_name is None:
            adapter_name = f"default_{len(self.adapters)}"
        if adapter_name in self.adapters:
            raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pass another adapter_name= or "
                             f"delete_adapters({adapter_name!r}) first")
        state_dict = read_weights(pretrained_model_name_or_path_or_dict, weight_name, _DEFAULT_FILES,
                                  subfolder=subfolder, allow_pickle=allow_pickle, what="LoRA", **hub_kwargs)
        layers, modules = self._parse(state_dict)
        self.adapters[adapter_name] = layers
        self.weights[adapter_name] = {}
        for (component, path), module in modules.items():
            self._attach(component, path, module)
        self.active = [adapter_name]

    def _parse(self, state_dict):
        """``({component: {path: LoraLayer}}, {(component, path): module})`` of a LoRA state dict."""
        parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        unknown = []
        indexes = {}
        for key, tensor in state_dict.items():
            found = self._locate(key, indexes)
            if found is None:
                unknown.append(key)
                continue
            component, path, role = found
            parts.setdefault((component, path), {})[role] = tensor
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise ValueError(f"the LoRA has {len(unknown)} keys that match no linear or conv layer of this "
                             f"pipeline's unet/text encoders: {shown}")
        layers: dict[str, dict[str, LoraLayer]] = {}
        modules = {}
        for (component, path), found in parts.items():
            modules[component, path] = indexes[component][2][path]
            layers.setdefault(component, {})[path] = self._layer(component, path, found, modules[component, path])
        return layers, modules

    def _locate(self, key: str, indexes: dict):
        """``(component, module path, "down" | "up" | "alpha")`` for a key, or None if it matches nothing."""
        for prefix, component in _KOHYA_PREFIXES.items():
            if key.startswith(prefix):
                for suffix, role in _KOHYA_SUFFIXES.items():
                    if key.endswith(suffix):
                        name = key[len(prefix):-len(suffix)]
                        path = self._index(component, indexes)[1].get(name)
                        return None if path is None else (component, path, role)
                return None
        component, _, rest = key.partition(".")
        if component not in ("unet", *_TEXT_ENCODERS):
            return None
        match = _PROCESSOR_KEY.search(rest)
        if match:
            projection = "to_out.0" if match.group(1) == "to_out" else match.group(1)
            name, role = rest[:match.start()] + "." + projection, match.group(2)
        else:
            for suffix, role in _DIFFUSERS_SUFFIXES.items():
                if rest.endswith(suffix):
                    name = rest[:-len(suffix)]
                    break
            else:
                return None
        path = self._index(component, indexes)[0].get(name)
        return None if path is None else (component, path, role)

    def _index(self, component: str, indexes: dict):
        """``(dotted name -> path, underscored name -> path, path -> module)`` of the component's linear and conv
        layers."""
        if component not in indexes:
            model = getattr(self.pipe, component, None)
            dotted, modules = {}, {}
            if isinstance(model, nn.Module):
                # transformers 5 CLIP text models have no ``text_model`` level, which LoRA files still name.
                alias = component in _TEXT_ENCODERS and not hasattr(model, "text_model")
                for name, module in model.named_modules():
                    if isinstance(module, (nn.Linear, nn.Conv2d)):
                        dotted[name] = name
                        modules[name] = module
                        if alias:
                            dotted["text_model." + name] = name
            indexes[component] = (dotted, {name.replace(".", "_"): path for name, path in dotted.items()}, modules)
        return indexes[component]

    @staticmethod
    def _layer(component: str, path: str, found: dict, module: nn.Module) -> LoraLayer:
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
            if down.ndim == 2:  # a linear-shaped update of a 1x1 convolution
                down, up = down[:, :, None, None], up[:, :, None, None]
        else:
            expected_down, expected_up = (rank, module.in_features), (module.out_features, rank)
        if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
            raise ValueError(f"the LoRA for {where} has down {tuple(down.shape)} / up {tuple(up.shape)}, but the "
                             f"layer needs {expected_down} / {expected_up}: the LoRA was made for another model")
        weight = module.weight
        alpha = found.get("alpha")
        scale = float(alpha) / rank if alpha is not None else 1.0
        return LoraLayer(down.to(weight.device, weight.dtype).contiguous(),
                         up.to(weight.device, weight.dtype).contiguous(), scale)

    # -- the forward hook ----------------------------------------------------------------------------------------

    def _attach(self, component: str, path: str, module: nn.Module):
        if (component, path) in self._hooks:
            return

        def add_lora(module, args, output):
            return self._apply(component, path, module, args[0], output)

        self._hooks[(component, path)] = (module, module.register_forward_hook(add_lora))

    def _apply(self, component, path, module, x, output):
        if not self.enabled:
            return output
        call = current_call()
        call_kwargs = getattr(call, "cross_attention_kwargs", None) if call is not None else None
        call_scale = call_kwargs.get("scale", 1.0) if call_kwargs else 1.0
        fused = self._fused.get((component, path), ())
        for name in self.active:
            layer = self.adapters[name].get(component, {}).get(path)
            if layer is None or name in fused:
                continue
            strength = layer.scale * self._weight(name, component, path) * call_scale
            if strength != 0:
                output = output + layer.delta_output(module, x) * strength
        return output

    def _weight(self, name: str, component: str, path: str) -> float:
        weight = self.weights[name].get(component, 1.0)
        if isinstance(weight, dict):
            return block_weight(weight, path)
        return weight

    # -- choosing adapters ---------------------------------------------------------------------------------------

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate ``adapter_names`` with weights: one number each, or a per-block dict as diffusers takes
        (``{"text_encoder": 0.5, "unet": {"down": 1.0, "mid": 0.0, "up": {"block_1": [1.0, 0.5]}}}``)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if adapter_weights is None:
            adapter_weights = [1.0] * len(names)
        elif not isinstance(adapter_weights, list):
            adapter_weights = [adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(f"set_adapters got {len(names)} adapter names but {len(adapter_weights)} weights; pass "
                             f"one weight per adapter")
        for name, weight in zip(names, adapter_weights):
            self.weights[name] = split_weights(1.0 if weight is None else weight, self.pipe)
        self.active = names

    def get_active_adapters(self) -> list[str]:
        return list(self.active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` of the components that hold LoRA layers."""
        listing: dict[str, list[str]] = {}
        for name, layers in self.adapters.items():
            for component in layers:
                listing.setdefault(component, []).append(name)
        return listing

    def enable_lora(self):
        self.enabled = True

    def disable_lora(self):
        self.enabled = False

    def _check_names(self, names):
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ValueError(f"no LoRA adapter named {', '.join(map(repr, missing))}; loaded adapters: "
                             f"{sorted(self.adapters) or 'none'}")

    # -- fusing --------------------------------------------------------------------------------------------------

    def fuse_lora(self, components=("unet", "text_encoder", "text_encoder_2"), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names=None):
        """Add the active adapters' (or ``adapter_names``') updates, times ``lora_scale``, into the weights."""
        names = self.active if adapter_names is None else list(adapter_names)
        self._check_names(names)
        with torch.no_grad():
            for (component, path), (module, _) in self._hooks.items():
                if component not in components:
                    continue
                fused = self._fused.setdefault((component, path), set())
                delta = None
                for name in names:
                    layer = self.adapters[name].get(component, {}).get(path)
                    if layer is None or name in fused:
                        continue
                    update = layer.delta_weight() * (layer.scale * self._weight(name, component, path) * lora_scale)
                    delta = update if delta is None else delta + update
                    fused.add(name)
                if delta is None:
                    continue
                fused_weight = module.weight + delta
                if safe_fusing and not torch.isfinite(fused_weight).all():
                    raise ValueError(f"fusing the LoRA into {component}.{path} gives non-finite weights; the LoRA "
                                     f"is broken (nothing was fused into this layer)")
                self._originals.setdefault((component, path), module.weight.detach().clone())
                module.weight.copy_(fused_weight)

    def unfuse_lora(self, components=("unet", "text_encoder", "text_encoder_2")):
        """Put back the weights as they were before ``fuse_lora``, exactly."""
        with torch.no_grad():
            for key in [k for k in self._originals if k[0] in components]:
                module = self._hooks[key][0]
                module.weight.copy_(self._originals.pop(key))
                self._fused.pop(key, None)

    # -- removing ------------------------------------------------------------------------------------------------

    def delete_adapters(self, adapter_names):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if any(name in fused for fused in self._fused.values() for name in names):
            raise ValueError(f"adapters {names} are fused into the weights; call unfuse_lora() before deleting them")
        for name in names:
            del self.adapters[name]
            del self.weights[name]
        self.active = [n for n in self.active if n not in names]
        if not self.active and self.adapters:
            # As PEFT does: with every active adapter gone, the first one loaded that is left takes over.
            self.active = [next(iter(self.adapters))]
        still_used = {(c, p) for layers in self.adapters.values() for c, modules in layers.items() for p in modules}
        for key in [k for k in self._hooks if k not in still_used]:
            self._hooks.pop(key)[1].remove()
            self._fused.pop(key, None)

    def unload_lora_weights(self):
        """Remove every LoRA. Unfused adapters leave no trace: the models compute exactly what they did before
        loading. Fused updates stay in the weights, as in diffusers (``fuse_lora`` then ``unload_lora_weights`` is
        how a LoRA is baked in); call ``unfuse_lora`` first to drop them too."""
        self._originals.clear()
        self._fused.clear()
        self.delete_adapters(list(self.adapters))
        self.enabled = True


# -- adapter weights -------------------------------------------------------------------------------------------


def split_weights(weight, pipe) -> dict:
    """One adapter's ``set_adapters`` weight as ``{component: float | per-block dict}``; components a dict leaves
    out keep weight 1."""
    if not isinstance(weight, dict):
        return {"unet": weight, **{name: weight for name in _TEXT_ENCODERS}}
    unknown = set(weight) - {"unet", *_TEXT_ENCODERS}
    if unknown:
        raise ValueError(f"set_adapters weight dict has unknown keys {sorted(unknown)}; its keys are components "
                         f"('unet', 'text_encoder', 'text_encoder_2'), UNet blocks go inside 'unet'")
    split = {name: value for name, value in weight.items() if value is not None}
    if isinstance(split.get("unet"), dict):
        check_block_weights(split["unet"], pipe.unet)
    return split


def check_block_weights(blocks: dict, unet):
    """Validate a per-block weight dict against the UNet's blocks; blocks left out keep weight 1."""
    counts = {"down": len(unet.down_blocks), "up": len(unet.up_blocks)}
    for part, value in blocks.items():
        if part not in ("down", "mid", "up"):
            raise ValueError(f"UNet block weights take 'down', 'mid' and 'up', not {part!r}")
        if part == "mid" and isinstance(value, list) and len(value) == 1:
            continue
        if part == "mid" or not isinstance(value, dict):
            if not isinstance(value, (int, float)):
                raise ValueError(f"the {part!r} block weight must be a number, got {value!r}")
            continue
        for block, layers in value.items():
            index = int(block.removeprefix("block_")) if re.fullmatch(r"block_\d+", block) else None
            if index is None or index >= counts[part]:
                raise ValueError(f"{part!r} has blocks block_0..block_{counts[part] - 1}, not {block!r}")
            transformers = getattr(unet, f"{part}_blocks")[index]
            n = len(getattr(transformers, "attentions", ()))
            if n == 0:
                raise ValueError(f"{part}.{block} has no transformer layers, so it takes no LoRA weight")
            if isinstance(layers, list) and len(layers) not in (1, n):
                raise ValueError(f"{part}.{block} has {n} transformer layers but got {len(layers)} weights")


def block_weight(blocks: dict, path: str, default: float = 1.0) -> float:
    """The weight of the UNet layer ``path`` under a per-block dict; parts and blocks the dict leaves out get
    ``default`` (1 for LoRA, 0 for IP-Adapter scales, as in diffusers).

    Only the attention (transformer) layers of a block are weighted, as in diffusers; the other layers of the
    UNet keep weight 1.
    """
    match = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.", path)
    if match:
        part, block, layer = match.group(1), int(match.group(2)), int(match.group(3))
        value = blocks.get(part, default)
        if not isinstance(value, dict):
            return value
        value = value.get(f"block_{block}", default)
        if isinstance(value, list):  # one weight per transformer layer, or one for all
            return value[layer] if len(value) > 1 else value[0]
        return value
    if path.startswith("mid_block.attentions."):
        value = blocks.get("mid", default)
        return value[0] if isinstance(value, list) else value
    return 1.0
