"""The original training configs (``v1-inference.yaml``, ``v2-inference-v.yaml``, ``sd_xl_base.yaml``,
``cldm_v15.yaml``...) as diffusers configs: the UNet, the VAE, the ControlNet and the scheduler settings they
describe.

LDM describes a UNet by a base width and multipliers, marks the levels that attend by their downsampling factor
(``attention_resolutions``), and gives attention either a head count or a head width; SDXL's ``sgm`` configs
call the UNet ``network_config`` and say v-prediction through the denoiser's scaling class. A config says
nothing of the image size: callers pass the size the model was trained at, and the UNet's ``sample_size`` is
that size in latent pixels.
"""

from __future__ import annotations

import os
from pathlib import Path


class OriginalConfigError(ValueError):
    """An original config that cannot be read or lacks a setting the conversion needs."""


# Context widths of SDXL's UNets (base, refiner): their "sequential" label embedding is the size/crop (and
# aesthetic score) conditioning. Any other model's (SD 2 unCLIP) is a projected class vector.
_SDXL_CONTEXT = (2048, 1280)
DEFAULT_SCALING_FACTOR = 0.18215  # the latent scale of the VAE of SD 1 and 2, for configs that do not say


def read(original_config) -> dict:
    """A parsed config: a dict as it is, or a local ``.yaml`` file (no download: pass the file)."""
    if isinstance(original_config, dict):
        return original_config
    source = os.fspath(original_config)
    if source.startswith(("http://", "https://")):
        raise OriginalConfigError(f"original_config={source!r}: configs are not downloaded; save the .yaml and pass "
                                  f"its path (or the parsed dict)")
    path = Path(source)
    if not path.is_file():
        raise OriginalConfigError(f"original_config={original_config!r} is not a file; pass the path of the "
                                  f"model's .yaml (or its parsed dict)")
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise OriginalConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise OriginalConfigError(f"{path} holds no mapping; is it a Stable Diffusion training config?")
    return config


def _params(config: dict, *path):
    node = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise OriginalConfigError(f"original_config has no {'.'.join(path)}; is it a Stable Diffusion "
                                      f"training config?")
        node = node[key]
    return node


def _net(config: dict) -> dict:
    model = _params(config, "model", "params")
    net = (model.get("unet_config") or model.get("network_config") or {}).get("params")
    if net is None:
        raise OriginalConfigError("original_config has no model.params.unet_config (or network_config) params")
    return net


def latent_scale(config: dict) -> int:
    """How many image pixels one latent pixel covers: the VAE halves the size at each level but the last."""
    return 2 ** (len(_params(config, "model", "params", "first_stage_config", "params", "ddconfig", "ch_mult")) - 1)


def _encoder(net: dict) -> dict:
    """The settings a UNet and its ControlNet share: the down path, attention and the label embedding."""
    widths = [net["model_channels"] * m for m in net["channel_mult"]]
    attends = [2 ** level in net.get("attention_resolutions", ()) for level in range(len(widths))]
    linear = bool(net.get("use_linear_in_transformer", False))
    # diffusers' attention_head_dim is the head count; LDM gives it, or the head width to divide by.
    heads = net.get("num_heads")
    if heads in (None, -1) and "num_head_channels" in net:
        heads = [w // net["num_head_channels"] for w in widths]
    context = net.get("context_dim")
    context = context[0] if isinstance(context, (list, tuple)) else context
    out = dict(in_channels=net["in_channels"], block_out_channels=widths, layers_per_block=net["num_res_blocks"],
               down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
               use_linear_projection=linear, cross_attention_dim=context,
               transformer_layers_per_block=net.get("transformer_depth") or 1, class_embed_type=None,
               addition_embed_type=None, addition_time_embed_dim=None, projection_class_embeddings_input_dim=None)
    if heads is not None:
        out["attention_head_dim"] = heads
    if net.get("num_classes") == "sequential":
        if context in _SDXL_CONTEXT:
            # pooled text plus sinusoidal size/crop (and aesthetic) embeddings of 256 each
            out.update(addition_embed_type="text_time", addition_time_embed_dim=256)
        else:
            out["class_embed_type"] = "projection"
        out["projection_class_embeddings_input_dim"] = net["adm_in_channels"]
    return out


def unet(config: dict, image_size: int | None = None) -> dict:
    """The diffusers UNet2DConditionModel settings of an LDM/SGM config; ``sample_size`` only with an image size."""
    net = _net(config)
    out = _encoder(net)
    attends = [t == "CrossAttnDownBlock2D" for t in out["down_block_types"]]
    out.update(out_channels=net["out_channels"],
               up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)])
    if isinstance(net.get("num_classes"), int):
        out["num_class_embeds"] = net["num_classes"]  # the x4 upscaler's noise-level table
    if "disable_self_attentions" in net:
        out["only_cross_attention"] = net["disable_self_attentions"]
    if image_size is not None:
        out["sample_size"] = image_size // latent_scale(config)
    return out


def controlnet(config: dict) -> dict:
    """The diffusers ControlNetModel settings of a ControlNet training config (``cldm_v15.yaml``...)."""
    net = _params(config, "model", "params", "control_stage_config", "params")
    return {**_encoder(net), "conditioning_channels": net["hint_channels"]}


def vae(config: dict, image_size: int | None = None) -> dict:
    model = _params(config, "model", "params")
    dd = _params(config, "model", "params", "first_stage_config", "params", "ddconfig")
    levels = len(dd["ch_mult"])
    out = dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], latent_channels=dd["z_channels"],
               block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               scaling_factor=model.get("scale_factor", DEFAULT_SCALING_FACTOR))
    if image_size is not None:
        out["sample_size"] = image_size
    return out


def scheduler(config: dict) -> dict:
    """Scheduler settings the config fixes: the training beta range, step count and prediction target."""
    model = _params(config, "model", "params")
    out = {}
    if "timesteps" in model:
        out["num_train_timesteps"] = model["timesteps"]
    if "linear_start" in model:
        out["beta_start"] = model["linear_start"]
    if "linear_end" in model:
        out["beta_end"] = model["linear_end"]
    scaling = str(((model.get("denoiser_config") or {}).get("params") or {}).get("scaling_config", {}).get("target"))
    v = model.get("parameterization") == "v" or scaling.endswith("VScaling")
    out["prediction_type"] = "v_prediction" if v else "epsilon"
    return out
