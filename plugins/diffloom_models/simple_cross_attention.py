"""The "simple cross-attention" UNet stages of unCLIP (Karlo), DeepFloyd IF and Kandinsky 2.x.

Instead of a spatial transformer, each resnet is followed by one attention layer whose keys and values are the
projected context followed by the pixels themselves (``AttnAddedKVProcessor`` in attention.py), with a residual
connection. Resampling is done by a resnet with ``down=True`` / ``up=True`` (BigGAN style). Module names are
diffusers' (``SimpleCrossAttnDownBlock2D``, ``SimpleCrossAttnUpBlock2D``, ``UNetMidBlock2DSimpleCrossAttn``).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .blocks import ResnetBlock2D


def _added_kv_attention(channels, head_dim, groups, cross_attention_dim, only_cross_attention,
                        cross_attention_norm) -> Attention:
    return Attention(channels, cross_attention_dim=channels, heads=channels // head_dim, dim_head=head_dim,
                     added_kv_proj_dim=cross_attention_dim, norm_num_groups=groups, bias=True,
                     only_cross_attention=only_cross_attention, cross_attention_norm=cross_attention_norm)


def _pick_mask(encoder_hidden_states, attention_mask, encoder_attention_mask):
    """These layers attend to the context and the pixels at once, so they take one mask. unCLIP passes its
    context mask as ``attention_mask``, which therefore wins over ``encoder_attention_mask``."""
    if attention_mask is not None:
        return attention_mask
    return encoder_attention_mask if encoder_hidden_states is not None else None


def _resnet_kwargs(temb_channels, dropout, resnet_eps, resnet_groups, resnet_time_scale_shift, resnet_act_fn,
                   output_scale_factor, skip_time_act) -> dict:
    return dict(temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
                time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor, skip_time_act=skip_time_act)


class SimpleCrossAttnDownBlock2D(nn.Module):
    """(resnet, added-KV attention) pairs, then a ``down=True`` resnet. ``attention_head_dim`` is the width of a
    head here (heads = channels / width)."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, attention_head_dim: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, add_downsample: bool = True,
                 skip_time_act: bool = False, only_cross_attention: bool = False,
                 cross_attention_norm: str | None = None):
        super().__init__()
        kw = _resnet_kwargs(temb_channels, dropout, resnet_eps, resnet_groups, resnet_time_scale_shift,
                            resnet_act_fn, output_scale_factor, skip_time_act)
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, **kw)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(
            _added_kv_attention(out_channels, attention_head_dim, resnet_groups, cross_attention_dim,
                                only_cross_attention, cross_attention_norm)
            for _ in range(num_layers))
        self.downsamplers = nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels,
                                                         down=True, **kw)]) if add_downsample else None

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                encoder_attention_mask=None, cross_attention_kwargs=None):
        mask = _pick_mask(encoder_hidden_states, attention_mask, encoder_attention_mask)
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=mask, **(cross_attention_kwargs or {}))
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            skips += (hidden_states,)
        return hidden_states, skips


class SimpleCrossAttnUpBlock2D(nn.Module):
    """(resnet on [hidden, skip], added-KV attention) pairs, then an ``up=True`` resnet (which doubles the size:
    these stages do not follow odd skip sizes)."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 attention_head_dim: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, skip_time_act: bool = False, only_cross_attention: bool = False,
                 cross_attention_norm: str | None = None):
        super().__init__()
        kw = _resnet_kwargs(temb_channels, dropout, resnet_eps, resnet_groups, resnet_time_scale_shift,
                            resnet_act_fn, output_scale_factor, skip_time_act)
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            block_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(in_channels=block_in + skip, out_channels=out_channels, **kw))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            _added_kv_attention(out_channels, attention_head_dim, resnet_groups, cross_attention_dim,
                                only_cross_attention, cross_attention_norm)
            for _ in range(num_layers))
        self.upsamplers = nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels,
                                                       up=True, **kw)]) if add_upsample else None

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None,
                encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None,
                cross_attention_kwargs=None):
        mask = _pick_mask(encoder_hidden_states, attention_mask, encoder_attention_mask)
        for resnet, attn in zip(self.resnets, self.attentions):
            *res_hidden_states_tuple, skip = res_hidden_states_tuple
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask,
                                 **(cross_attention_kwargs or {}))
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class UNetMidBlock2DSimpleCrossAttn(nn.Module):
    """resnet, then ``num_layers`` x (added-KV attention, resnet). ``resnet_groups=None`` means
    min(channels / 4, 32)."""

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attention_head_dim: int = 1, output_scale_factor: float = 1.0,
                 cross_attention_dim: int = 1280, skip_time_act: bool = False, only_cross_attention: bool = False,
                 cross_attention_norm: str | None = None):
        super().__init__()
        if resnet_groups is None:
            resnet_groups = min(in_channels // 4, 32)
        kw = _resnet_kwargs(temb_channels, dropout, resnet_eps, resnet_groups, resnet_time_scale_shift,
                            resnet_act_fn, output_scale_factor, skip_time_act)
        self.attentions = nn.ModuleList(
            _added_kv_attention(in_channels, attention_head_dim, resnet_groups, cross_attention_dim,
                                only_cross_attention, cross_attention_norm)
            for _ in range(num_layers))
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels=in_channels, out_channels=in_channels, **kw)
                                     for _ in range(num_layers + 1))

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                encoder_attention_mask=None, cross_attention_kwargs=None):
        mask = _pick_mask(encoder_hidden_states, attention_mask, encoder_attention_mask)
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask,
                                 **(cross_attention_kwargs or {}))
            hidden_states = resnet(hidden_states, temb)
        return hidden_states
