"""ControlNet (Zhang et al. 2023): a trainable copy of a UNet's down path and middle that reads an extra image
condition, and returns one residual per UNet skip plus one for the middle.

The copy is built from the UNet's own stages and embeddings (unet_2d_condition.py). Each output passes a
zero-initialised 1x1 conv, so a fresh ControlNet (``from_unet``) leaves the UNet's prediction unchanged. Config
keys, state-dict names and outputs are diffusers' ``ControlNetModel``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffloom.configuration import register_to_config
from diffloom.modeling import ModelMixin
from diffloom.outputs import BaseOutput

from .attention import AttentionProcessorMixin
from .transformer import mask_to_bias
from .unet_2d_condition import (ConditioningEmbeddings, UNet2DConditionModel, build_down_blocks, build_mid_block,
                                check_block_types, per_block)


@dataclass
class ControlNetOutput(BaseOutput):
    down_block_res_samples: tuple = None
    mid_block_res_sample: torch.Tensor = None


class ControlNetConditioningEmbedding(nn.Module):
    """The condition image (full resolution) -> latent-resolution features: a small conv stack that halves the
    size at each step of ``block_out_channels``, SiLU between convs, and a zero-initialised output conv."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels=(16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(block_out_channels[-1], conditioning_embedding_channels, kernel_size=3,
                                        padding=1))

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(conditioning))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNetModel(ModelMixin, AttentionProcessorMixin, ConditioningEmbeddings):
    """``controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, ...)`` ->
    ``down_block_res_samples`` (one per UNet skip) and ``mid_block_res_sample``, to pass to the UNet as
    ``down_block_additional_residuals`` / ``mid_block_additional_residual``."""

    @register_to_config
    def __init__(self, in_channels: int = 4, conditioning_channels: int = 3, flip_sin_to_cos: bool = True,
                 freq_shift: int = 0,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 mid_block_type: str | None = "UNetMidBlock2DCrossAttn", only_cross_attention=False,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block: int = 2, downsample_padding: int = 1,
                 mid_block_scale_factor: float = 1, act_fn: str = "silu", norm_num_groups: int | None = 32,
                 norm_eps: float = 1e-5, cross_attention_dim: int = 1280, transformer_layers_per_block=1,
                 encoder_hid_dim: int | None = None, encoder_hid_dim_type: str | None = None,
                 attention_head_dim=8, num_attention_heads=None, use_linear_projection: bool = False,
                 class_embed_type: str | None = None, addition_embed_type: str | None = None,
                 addition_time_embed_dim: int | None = None, num_class_embeds: int | None = None,
                 upcast_attention: bool = False, resnet_time_scale_shift: str = "default",
                 projection_class_embeddings_input_dim: int | None = None,
                 controlnet_conditioning_channel_order: str = "rgb",
                 conditioning_embedding_out_channels=(16, 32, 96, 256), global_pool_conditions: bool = False,
                 addition_embed_type_num_heads: int = 64):
        super().__init__()
        n = len(down_block_types)
        if len(block_out_channels) != n:
            raise ValueError(f"block_out_channels has {len(block_out_channels)} entries but down_block_types has {n}")
        if mid_block_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            raise ValueError(f"mid_block_type={mid_block_type!r}: a ControlNet needs a middle block, "
                             f"'UNetMidBlock2DCrossAttn' or 'UNetMidBlock2D'")
        check_block_types(down_block_types, (), mid_block_type, model="ControlNetModel")
        if controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order={controlnet_conditioning_channel_order!r} is "
                             f"not 'rgb' or 'bgr'")
        if encoder_hid_dim_type not in (None, "text_proj", "text_image_proj"):
            raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r}: ControlNetModel takes None, "
                             f"'text_proj' or 'text_image_proj'")
        if addition_embed_type not in (None, "text", "text_image", "text_time"):
            raise ValueError(f"addition_embed_type={addition_embed_type!r}: ControlNetModel takes None, 'text', "
                             f"'text_image' or 'text_time'")
        if class_embed_type == "simple_projection":
            # diffusers' ControlNetModel builds no class embedding for it (and ignores class_labels); neither do
            # we, so that its folders load and give the same residuals.
            class_embed_type = num_class_embeds = None

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = self._init_embeddings(
            block_out_channels=block_out_channels, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            act_fn=act_fn, cross_attention_dim=cross_attention_dim, class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            class_timestep_act_fn="silu",  # unlike the UNet's, whatever act_fn is
            addition_embed_type=addition_embed_type, addition_time_embed_dim=addition_time_embed_dim,
            addition_embed_type_num_heads=addition_embed_type_num_heads, encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            block_out_channels[0], conditioning_channels, conditioning_embedding_out_channels)

        head_config = per_block(attention_head_dim, n, "attention_head_dim")
        # As in the UNet, attention_head_dim counts the heads of spatial transformers unless num_attention_heads
        # is given; the other attention stages read it as a head width.
        num_heads = (per_block(num_attention_heads, n, "num_attention_heads") if num_attention_heads is not None
                     else head_config)
        depths = per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        context_dims = per_block(cross_attention_dim, n, "cross_attention_dim")
        shared = dict(norm_eps=norm_eps, act_fn=act_fn, norm_num_groups=norm_num_groups, dropout=0.0,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      resnet_time_scale_shift=resnet_time_scale_shift)
        self.down_blocks = build_down_blocks(
            down_block_types, block_out_channels, time_embed_dim, layers_per_block=[layers_per_block] * n,
            transformer_layers=depths, num_attention_heads=num_heads, attention_head_dim=head_config,
            cross_attention_dim=context_dims,
            only_cross_attention=per_block(only_cross_attention, n, "only_cross_attention"),
            downsample_padding=downsample_padding, **shared)
        self.mid_block = build_mid_block(mid_block_type, block_out_channels[-1], time_embed_dim,
                                         transformer_layers=depths[-1], num_attention_heads=num_heads[-1],
                                         attention_head_dim=None, cross_attention_dim=context_dims[-1],
                                         only_cross_attention=False, mid_block_scale_factor=mid_block_scale_factor,
                                         **shared)

        # One zero conv per UNet skip: conv_in's output, each resnet's, each downsampler's.
        skip_channels = [block_out_channels[0]]
        for i, channels in enumerate(block_out_channels):
            skip_channels += [channels] * (layers_per_block + (i < n - 1))
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, kernel_size=1)) for c in skip_channels)
        self.controlnet_mid_block = _zero(nn.Conv2d(block_out_channels[-1], block_out_channels[-1], kernel_size=1))

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, controlnet_conditioning_channel_order: str = "rgb",
                  conditioning_embedding_out_channels=(16, 32, 96, 256), load_weights_from_unet: bool = True,
                  conditioning_channels: int = 3) -> "ControlNetModel":
        """A ControlNet shaped like ``unet``, its encoder weights copied from it (the new parts start at zero,
        except the condition encoder's inner convs, which start random as in the paper)."""
        config = unet.config
        layers_per_block = config.layers_per_block
        if isinstance(layers_per_block, (list, tuple)):
            if len(set(layers_per_block)) != 1:
                raise ValueError(f"the UNet has layers_per_block={list(layers_per_block)}; a ControlNet takes one "
                                 f"count for all stages")
            layers_per_block = layers_per_block[0]
        for key, plain in (("time_embedding_type", "positional"), ("time_cond_proj_dim", None)):
            if config.get(key, plain) != plain:
                raise ValueError(f"the UNet has {key}={config[key]!r}, but a ControlNetModel embeds timesteps "
                                 f"sinusoidally without a timestep_cond projection, so it cannot copy this UNet")
        copied = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
                  "only_cross_attention", "block_out_channels", "downsample_padding", "mid_block_scale_factor",
                  "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
                  "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads",
                  "use_linear_projection", "class_embed_type", "addition_embed_type", "addition_time_embed_dim",
                  "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
                  "projection_class_embeddings_input_dim")
        controlnet = cls(**{k: config[k] for k in copied if k in config}, layers_per_block=layers_per_block,
                         controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
                         conditioning_embedding_out_channels=conditioning_embedding_out_channels,
                         conditioning_channels=conditioning_channels)
        if load_weights_from_unet:  # as diffusers: encoder_hid_proj, which the ControlNet never uses, stays fresh
            for name in ("conv_in", "time_embedding", "class_embedding", "add_embedding", "down_blocks",
                         "mid_block"):
                target = getattr(controlnet, name)
                if target is not None:
                    target.load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, added_cond_kwargs: dict | None = None,
                cross_attention_kwargs: dict | None = None, guess_mode: bool = False, return_dict: bool = True):
        """``controlnet_cond`` is the condition image at ``8x`` the latent size (with the default embedding).

        ``guess_mode`` ramps the residual scales from 0.1 (first skip) to 1.0 (middle), for use without a
        prompt; every scale is multiplied by ``conditioning_scale``.
        """
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        emb = self._time_embed(sample, timestep, timestep_cond)
        class_emb = self._class_embed(sample, class_labels)
        if class_emb is not None:
            emb = emb + class_emb
        # As in diffusers' ControlNetModel, a "text_image" added embedding and the encoder_hid_proj are built
        # (their weights load) but not applied: the context reaches the attention layers as given.
        if self.config.addition_embed_type in ("text", "text_time"):
            emb = emb + self._added_embed(emb, encoder_hidden_states, added_cond_kwargs)[0]
        context = dict(encoder_hidden_states=encoder_hidden_states,
                       attention_mask=mask_to_bias(attention_mask, sample.dtype),
                       cross_attention_kwargs=cross_attention_kwargs)

        def run(block, *args):
            return block(*args, **context) if getattr(block, "has_cross_attention", False) else block(*args)

        sample = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = (sample,)
        for block in self.down_blocks:
            sample, block_skips = run(block, sample, emb)
            skips += block_skips
        sample = run(self.mid_block, sample, emb)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(sample)
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down = [s * scale for s, scale in zip(down, scales)]
            mid = mid * scales[-1]
        else:
            down = [s * conditioning_scale for s in down]
            mid = mid * conditioning_scale
        if self.config.global_pool_conditions:  # conditions that describe the whole image (e.g. shuffle)
            down = [s.mean(dim=(2, 3), keepdim=True) for s in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)

        if not return_dict:
            return (down, mid)
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid)
