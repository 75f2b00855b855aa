"""Key names between the diffusers layout and the original Stable Diffusion (LDM) layout.

Every mapping is derived from the keys of the diffusers-layout model itself (how many resnets each block has,
whether it has attentions and a down/upsampler), so any config converts, tiny test models included. A map
goes diffusers key -> original key; reading a file inverts it, so a file key with no partner is "unknown"
and a model key the file lacks is "missing".

The LDM UNet numbers its layers flatly: ``input_blocks.0`` is the stem conv, then every resnet (with its
transformer, if any) of every down level, each level closed by a downsampler; ``output_blocks`` does the same
for the up levels, with the upsampler sitting inside the level's last entry.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch


class ConversionError(ValueError):
    """Weights that do not fit the layout they are converted to or from; names the first offending keys."""


def first(keys, n=5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


# -- UNet and ControlNet ------------------------------------------------------------------------------------

# Inside a ResBlock: LDM wraps its layers in Sequentials (norm, SiLU, conv) and names the shortcut differently.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Fixed names outside the blocks; the embeddings are Sequentials (linear, SiLU, linear). LDM has one label
# embedding: SDXL's size/crop conditioning (diffusers' add_embedding), a projected class vector (SD unCLIP) or a
# class table (the x4 upscaler's noise level), which diffusers calls class_embedding.
_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
               "add_embedding.linear_2": "label_emb.0.2", "class_embedding.linear_1": "label_emb.0.0",
               "class_embedding.linear_2": "label_emb.0.2", "class_embedding": "label_emb",
               "conv_norm_out": "out.0", "conv_out": "out.2", "controlnet_mid_block": "middle_block_out.0"}
# Config features whose weights have no name in the original layout, as the error names them.
_NO_ORIGINAL_NAME = {"time_embedding.cond_proj": "time_cond_proj_dim (LCM's guidance-scale embedding)"}


def _counts(keys, prefix):
    """{block index: number of resnets} and the set of blocks with attentions, for ``down_blocks``/``up_blocks``."""
    resnets, attentions, samplers = defaultdict(int), set(), set()
    for key in keys:
        m = re.match(rf"{prefix}\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.", key)
        if not m:
            continue
        block, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
        if kind == "resnets":
            resnets[block] = max(resnets[block], index + 1)
        elif kind == "attentions":
            attentions.add(block)
        else:
            samplers.add(block)
    return resnets, attentions, samplers


def _sub(path, table):
    """``path`` (inside a block) with its first dotted component renamed by ``table``."""
    head, dot, tail = path.partition(".")
    return f"{table.get(head, head)}{dot}{tail}"


def unet_key_map(keys) -> dict[str, str]:
    """diffusers UNet2DConditionModel / ControlNetModel key -> LDM key (without ``model.diffusion_model.``)."""
    down, _, downsampled = _counts(keys, "down_blocks")
    up, up_attn, _ = _counts(keys, "up_blocks")
    down_start, index = {}, 1
    for b in sorted(down):
        down_start[b] = index
        index += down[b] + (1 if b in downsampled else 0)
    up_start, index = {}, 0
    for b in sorted(up):
        up_start[b] = index
        index += up[b]

    n_blocks = sum(1 for k in keys if re.fullmatch(r"controlnet_cond_embedding\.blocks\.\d+\.weight", k))
    out = {}
    for key in keys:
        name, _, param = key.rpartition(".")
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            b, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            at = f"input_blocks.{down_start[b] + i}"
            target = f"{at}.0.{_sub(rest, _RESNET)}" if kind == "resnets" else f"{at}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
            b = int(m.group(1))
            target = f"input_blocks.{down_start[b] + down[b]}.0.op"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            b, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            at = f"output_blocks.{up_start[b] + i}"
            target = f"{at}.0.{_sub(rest, _RESNET)}" if kind == "resnets" else f"{at}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
            b = int(m.group(1))
            slot = 2 if b in up_attn else 1  # after the resnet, and after the transformer if there is one
            target = f"output_blocks.{up_start[b] + up[b] - 1}.{slot}.conv"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            # LDM's middle block is resnet, transformer, resnet: positions 0, 1, 2.
            target = (f"middle_block.{2 * i}.{_sub(rest, _RESNET)}" if kind == "resnets"
                      else f"middle_block.1.{rest}")
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", name):
            target = f"zero_convs.{m.group(1)}.0"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.(conv_in|blocks\.(\d+)|conv_out)", name):
            # LDM's hint block is one Sequential of convs with a SiLU after each but the last.
            position = {"conv_in": 0, "conv_out": 2 * (n_blocks + 1)}.get(m.group(1))
            if position is None:
                position = 2 * (int(m.group(2)) + 1)
            target = f"input_hint_block.{position}"
        elif name in _UNET_FIXED:
            target = _UNET_FIXED[name]
        elif name in _NO_ORIGINAL_NAME:
            raise ConversionError(f"the config sets {_NO_ORIGINAL_NAME[name]}, whose weights ({key}) have no name "
                                  f"in the original layout: a single file cannot hold this UNet; keep it in a "
                                  f"diffusers folder (from_pretrained / save_pretrained)")
        else:
            raise ConversionError(f"the UNet key {key} has no place in the original Stable Diffusion layout "
                                  f"(a feature of this config that single files do not carry)")
        out[key] = f"{target}.{param}"
    return out


# -- VAE ----------------------------------------------------------------------------------------------------

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_key_map(keys) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM key (without ``first_stage_model.``)."""
    up, _, _ = _counts([k.removeprefix("decoder.") for k in keys if k.startswith("decoder.")], "up_blocks")
    n_up = len(up)
    out = {}
    for key in keys:
        if m := re.fullmatch(r"(encoder|decoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            target = f"{m.group(1)}.down.{m.group(2)}.block.{m.group(3)}.{_sub(m.group(4), _VAE_RESNET)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            target = f"{m.group(1)}.down.{m.group(2)}.downsample.conv.{m.group(3)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            # LDM counts the decoder's levels from the highest resolution, diffusers from the lowest.
            level = n_up - 1 - int(m.group(1))
            target = f"decoder.up.{level}.block.{m.group(2)}.{_sub(m.group(3), _VAE_RESNET)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            target = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            target = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_sub(m.group(3), _VAE_RESNET)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)(?:\.0)?\.(weight|bias)", key):
            if m.group(2) not in _VAE_ATTENTION:
                raise ConversionError(f"the VAE key {key} has no place in the original layout")
            target = f"{m.group(1)}.mid.attn_1.{_VAE_ATTENTION[m.group(2)]}.{m.group(3)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            target = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
            target = key
        else:
            raise ConversionError(f"the VAE key {key} has no place in the original Stable Diffusion layout")
        out[key] = target
    return out


def _is_vae_attention_weight(key: str) -> bool:
    # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers: same numbers, 2 more dims.
    return bool(re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight",
                             key))


# -- mapping a whole model ------------------------------------------------------------------------------------

def _key_map(kind, keys):
    return unet_key_map(keys) if kind in ("unet", "controlnet") else vae_key_map(keys)


def model_to_original(kind: str, state_dict: dict) -> dict[str, torch.Tensor]:
    """A diffusers-layout UNet/ControlNet/VAE state dict in LDM names (no component prefix)."""
    mapping = _key_map(kind, list(state_dict))
    out = {}
    for key, value in state_dict.items():
        if kind == "vae" and _is_vae_attention_weight(key):
            value = value[:, :, None, None]
        out[mapping[key]] = value
    return out


def model_from_original(kind: str, tensors: dict, expected: dict, where: str) -> dict[str, torch.Tensor]:
    """LDM-named ``tensors`` in the names (and shapes) of ``expected``, a diffusers-layout state dict. A file
    already in diffusers' names (a model folder's weights file) is taken as it is."""
    if set(tensors) == set(expected):
        return dict(tensors)
    try:
        mapping = _key_map(kind, list(expected))
    except ConversionError as e:
        raise ConversionError(f"{where}: {e}") from None
    inverse = {v: k for k, v in mapping.items()}
    unknown = [k for k in tensors if k not in inverse]
    missing = [v for v in mapping.values() if v not in tensors]
    check(where, unknown, missing)
    out = {}
    for original, value in tensors.items():
        key = inverse[original]
        if kind == "vae" and _is_vae_attention_weight(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def check(where: str, unknown, missing):
    parts = []
    if unknown:
        parts.append(f"{len(unknown)} unknown keys (first: {first(unknown)})")
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {first(missing)})")
    if parts:
        raise ConversionError(f"{where}: {'; '.join(parts)}; the file does not match the config it is read "
                              f"with: pass config= (a diffusers folder of the same model) or check the file")


# -- text encoders --------------------------------------------------------------------------------------------

# Between transformers' CLIP text keys (``text_model.`` prefix stripped) and OpenCLIP's.
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPENCLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
# OpenCLIP keeps these outside the text tower the pipelines use.
OPENCLIP_IGNORED = ("logit_scale",)


def _canonical(key: str) -> str:
    """transformers 5 drops ``text_model.`` from CLIPTextModel's keys but keeps it in the projection model's."""
    return key.removeprefix("text_model.")


def clip_to_original(state_dict: dict) -> dict:
    """A transformers CLIP text model's state dict as ``cond_stage_model.transformer`` holds it."""
    return {f"text_model.{_canonical(k)}": v for k, v in state_dict.items() if not k.endswith("position_ids")}


def clip_from_original(tensors: dict, expected: dict, where: str) -> dict:
    by_canonical = {_canonical(k): k for k in expected}
    out, unknown = {}, []
    for key, value in tensors.items():
        name = _canonical(key)
        if name.endswith("position_ids"):
            continue  # a buffer older files saved; the model rebuilds it
        if name in by_canonical:
            out[by_canonical[name]] = value
        else:
            unknown.append(key)
    check(where, unknown, [f"text_model.{n}" for n, k in by_canonical.items() if k not in out])
    return out


def openclip_to_original(state_dict: dict) -> dict:
    """A transformers CLIP text model's state dict in OpenCLIP names; q, k, v join into one in-projection."""
    out, qkv = {}, defaultdict(dict)
    for key, value in state_dict.items():
        name = _canonical(key)
        if name.endswith("position_ids"):
            continue
        if name in _OPENCLIP_FIXED:
            out[_OPENCLIP_FIXED[name]] = value
        elif name == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP multiplies x @ P, a Linear does x @ W.T
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", name):
            qkv[(m.group(1), m.group(3))][m.group(2)] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            if m.group(2) not in _OPENCLIP_LAYER:
                raise ConversionError(f"the text encoder key {key} has no place in the OpenCLIP layout")
            out[f"transformer.resblocks.{m.group(1)}.{_OPENCLIP_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise ConversionError(f"the text encoder key {key} has no place in the OpenCLIP layout")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def openclip_from_original(tensors: dict, expected: dict, where: str, num_layers: int) -> dict:
    """OpenCLIP text-tower tensors in the names of ``expected``; layers past ``num_layers`` are dropped (SD 2
    reads the penultimate layer, so diffusers' SD 2 text encoder has one layer fewer than the file)."""
    by_canonical = {_canonical(k): k for k in expected}
    reverse_fixed = {v: k for k, v in _OPENCLIP_FIXED.items()}
    reverse_layer = {v: k for k, v in _OPENCLIP_LAYER.items()}
    out, unknown = {}, []

    def put(name, value, source):
        if name in by_canonical:
            out[by_canonical[name]] = value
        else:
            unknown.append(source)

    for key, value in tensors.items():
        if key in OPENCLIP_IGNORED:
            continue
        if key in reverse_fixed:
            put(reverse_fixed[key], value, key)
        elif key == "text_projection":
            if "text_projection.weight" in by_canonical:
                put("text_projection.weight", value.T.contiguous(), key)
            # A text model without projection (SD 2) does not use it.
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, inner, param = int(m.group(1)), m.group(2), m.group(3)
            if layer >= num_layers:
                continue
            if inner in reverse_layer:
                put(f"encoder.layers.{layer}.{reverse_layer[inner]}.{param}", value, key)
            else:
                unknown.append(key)
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            layer, param = int(m.group(1)), m.group(2)
            if layer >= num_layers:
                continue
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                put(f"encoder.layers.{layer}.self_attn.{name}_proj.{param}", part, key)
        else:
            unknown.append(key)
    missing = [n for n, k in by_canonical.items() if k not in out and not n.endswith("position_ids")]
    check(where, unknown, missing)
    return out
