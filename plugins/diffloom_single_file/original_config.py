"""The original training configs (``v1-inference.yaml``, ``v2-inference-v.yaml``, ``sd_xl_base.yaml``...) as
diffusers configs: the UNet, the VAE and the scheduler settings they describe.

LDM describes a UNet by a base width and multipliers, marks the levels that attend by their downsampling factor
(``attention_resolutions``), and gives attention either a head count or a head width; SDXL's ``sgm`` configs
call the UNet ``network_config`` and say v-prediction through the denoiser's scaling class.
"""

from __future__ import annotations

import os
from pathlib import Path


class OriginalConfigError(ValueError):
    """An original config that cannot be read or lacks a setting the conversion needs."""


def read(original_config) -> dict:
    """A parsed config: a dict as it is, or a local ``.yaml`` file (no download: pass the file)."""
    if isinstance(original_config, dict):
        return original_config
    path = Path(os.fspath(original_config))
    if not path.is_file():
        raise OriginalConfigError(f"original_config={original_config!r} is not a file; pass the path of the "
                                  f"model's .yaml (or its parsed dict)")
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise OriginalConfigError(f"{path} is not valid YAML: {e}") from None


def _params(config: dict, *path, source="original_config"):
    node = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise OriginalConfigError(f"{source} has no {'.'.join(path)}; is it a Stable Diffusion training config?")
        node = node[key]
    return node


def unet(config: dict) -> dict:
    """The diffusers UNet2DConditionModel settings of an LDM/SGM config (sample_size excluded)."""
    model = _params(config, "model", "params")
    net = (model.get("unet_config") or model.get("network_config") or {}).get("params")
    if net is None:
        raise OriginalConfigError("original_config has no model.params.unet_config (or network_config) params")
    widths = [net["model_channels"] * m for m in net["channel_mult"]]
    attends = [2 ** level in net.get("attention_resolutions", ()) for level in range(len(widths))]
    heads = net.get("num_heads", -1)
    if heads in (None, -1):
        heads = [w // net["num_head_channels"] for w in widths]
    out = dict(in_channels=net["in_channels"], out_channels=net["out_channels"], block_out_channels=widths,
               layers_per_block=net["num_res_blocks"],
               down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
               up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
               attention_head_dim=heads, use_linear_projection=bool(net.get("use_linear_in_transformer", False)),
               transformer_layers_per_block=net.get("transformer_depth") or 1)
    context = net.get("context_dim")
    out["cross_attention_dim"] = context[0] if isinstance(context, (list, tuple)) else context
    if net.get("num_classes") == "sequential":
        # SDXL's extra conditioning: pooled text plus sinusoidal size/crop (and aesthetic) embeddings of 256 each.
        out.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=net["adm_in_channels"])
    return out


def vae(config: dict) -> dict:
    model = _params(config, "model", "params")
    dd = _params(config, "model", "params", "first_stage_config", "params", "ddconfig")
    levels = len(dd["ch_mult"])
    out = dict(in_channels=dd["in_channels"], out_channels=dd["out_ch"], latent_channels=dd["z_channels"],
               block_out_channels=[dd["ch"] * m for m in dd["ch_mult"]], layers_per_block=dd["num_res_blocks"],
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    if "scale_factor" in model:
        out["scaling_factor"] = model["scale_factor"]
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
