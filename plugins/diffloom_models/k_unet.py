"""The stages of Katherine Crowson's k-diffusion UNet, as used by the Stable Diffusion x2 latent upscaler.

Every normalisation is an adaptive group norm: the conditioning vector ``emb`` predicts a per-channel scale and
shift for an affine-free group norm of 32-channel groups. Resnets carry no separate time projection; attention
blocks (``KAttentionBlock``) have no feed-forward; resampling is a fixed [1, 3, 3, 1] blur with reflect
padding. Down stages keep one skip per resnet (none for the downsampler) and up stages read only the last skip
they are given, which is ``None`` for the stage that mirrors the bottom (it is fed no skip at all).

Module names are diffusers' (``KDownBlock2D``, ``KCrossAttnDownBlock2D``, ``KUpBlock2D``,
``KCrossAttnUpBlock2D``), so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, dropout_layer
from .blocks import activation

GROUP_SIZE = 32


def _blur_kernel(x: torch.Tensor, gain: float) -> torch.Tensor:
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8 * gain
    return torch.outer(taps, taps).to(x.device, x.dtype).expand(x.shape[1], 1, 4, 4)


def k_downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve the size: reflect-pad by one pixel, blur, keep every second pixel."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), _blur_kernel(x, 1.0), stride=2, groups=x.shape[1])


def k_upsample(x: torch.Tensor) -> torch.Tensor:
    """Double the size: reflect-pad by one pixel, then a transposed stride-2 blur (gain 2 per axis keeps the
    mean level), cropped back to twice the input size."""
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv_transpose2d(x, _blur_kernel(x, 2.0), stride=2, padding=3, groups=x.shape[1])


class AdaGroupNorm(nn.Module):
    """Group norm without learned affine parameters; ``linear(emb)`` gives the scale (around 1) and shift."""

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


class ResnetBlockCondNorm2D(nn.Module):
    """AdaGroupNorm -> act -> conv -> AdaGroupNorm -> act -> dropout -> conv, plus the input (through a bias-free
    1x1 conv when the width changes). ``conv_2d_out_channels`` lets the second conv change the width again."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, groups: int, groups_out: int,
                 eps: float, non_linearity: str, dropout: float = 0.0, conv_2d_out_channels: int | None = None):
        super().__init__()
        final_channels = conv_2d_out_channels or out_channels
        self.norm1 = AdaGroupNorm(temb_channels, in_channels, groups, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = AdaGroupNorm(temb_channels, out_channels, groups_out, eps=eps)
        self.dropout = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(out_channels, final_channels, kernel_size=3, padding=1)
        self.nonlinearity = activation(non_linearity)
        self.conv_shortcut = (nn.Conv2d(in_channels, final_channels, kernel_size=1, bias=False)
                              if in_channels != final_channels else None)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(input_tensor, temb)))
        hidden_states = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden_states, temb))))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


class KAttentionBlock(nn.Module):
    """Optional self-attention, then cross-attention to the (LayerNorm'd) context, each on an AdaGroupNorm'd
    input and added back; no feed-forward."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, cross_attention_dim: int,
                 temb_channels: int, add_self_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        groups = max(1, dim // GROUP_SIZE)
        self.add_self_attention = add_self_attention
        if add_self_attention:
            self.norm1 = AdaGroupNorm(temb_channels, dim, groups)
            self.attn1 = Attention(dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=True)
        self.norm2 = AdaGroupNorm(temb_channels, dim, groups)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
                               dim_head=attention_head_dim, bias=True, upcast_attention=upcast_attention,
                               cross_attention_norm="layer_norm")

    def forward(self, hidden_states, encoder_hidden_states=None, emb=None, attention_mask=None,
                encoder_attention_mask=None, cross_attention_kwargs=None):
        kwargs = cross_attention_kwargs or {}
        # Attention takes the (B, C, H, W) map as H*W tokens and gives the map back (in channels-last memory
        # order, which the sums keep, as in diffusers: the next group norm's rounding depends on it).
        if self.add_self_attention:
            hidden_states = self.attn1(self.norm1(hidden_states, emb), attention_mask=attention_mask,
                                       **kwargs) + hidden_states
        mask = attention_mask if encoder_hidden_states is None else encoder_attention_mask
        return self.attn2(self.norm2(hidden_states, emb), encoder_hidden_states=encoder_hidden_states,
                          attention_mask=mask, **kwargs) + hidden_states


def _resnet(in_channels, out_channels, temb_channels, eps, act_fn, dropout, conv_2d_out_channels=None):
    return ResnetBlockCondNorm2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                                 groups=in_channels // GROUP_SIZE, groups_out=out_channels // GROUP_SIZE, eps=eps,
                                 non_linearity=act_fn, dropout=dropout, conv_2d_out_channels=conv_2d_out_channels)


class KDownBlock2D(nn.Module):
    """Resnets, then an optional blur downsample."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 4, resnet_eps: float = 1e-5, resnet_act_fn: str = "gelu",
                 add_downsample: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_eps, resnet_act_fn,
                    dropout)
            for i in range(num_layers))
        self.add_downsample = add_downsample

    def forward(self, hidden_states, temb=None):
        skips = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips += (hidden_states,)
        if self.add_downsample:
            hidden_states = k_downsample(hidden_states)
        return hidden_states, skips


class KCrossAttnDownBlock2D(nn.Module):
    """(resnet, attention block) pairs, then an optional blur downsample. The bottom stage (no downsample) adds
    self-attention and keeps no skips: its mirror takes none."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, cross_attention_dim: int,
                 dropout: float = 0.0, num_layers: int = 4, add_downsample: bool = True,
                 attention_head_dim: int = 64, add_self_attention: bool = False, resnet_eps: float = 1e-5,
                 resnet_act_fn: str = "gelu"):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_eps, resnet_act_fn,
                    dropout)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(
            KAttentionBlock(out_channels, out_channels // attention_head_dim, attention_head_dim,
                            cross_attention_dim, temb_channels, add_self_attention=add_self_attention)
            for _ in range(num_layers))
        self.add_downsample = add_downsample

    def forward(self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None,
                encoder_attention_mask=None, cross_attention_kwargs=None):
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states=encoder_hidden_states, emb=temb,
                                 attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                                 cross_attention_kwargs=cross_attention_kwargs)
            skips += (hidden_states if self.add_downsample else None,)
        if self.add_downsample:
            hidden_states = k_downsample(hidden_states)
        return hidden_states, skips


class KUpBlock2D(nn.Module):
    """[hidden, last skip] -> ``num_layers - 1`` resnets (the last one narrows to ``in_channels``), then an
    optional blur upsample."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 5, resnet_eps: float = 1e-5, resnet_act_fn: str = "gelu",
                 add_upsample: bool = True):
        super().__init__()
        n = num_layers - 1
        resnets = []
        for i in range(n):
            block_in = 2 * out_channels if i == 0 else out_channels
            # The narrowing last resnet still normalises its output in groups of the stage width.
            resnets.append(ResnetBlockCondNorm2D(
                in_channels=block_in, out_channels=in_channels if i == n - 1 else out_channels,
                temb_channels=temb_channels, groups=block_in // GROUP_SIZE, groups_out=out_channels // GROUP_SIZE,
                eps=resnet_eps, non_linearity=resnet_act_fn, dropout=dropout))
        self.resnets = nn.ModuleList(resnets)
        self.add_upsample = add_upsample

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        if res_hidden_states_tuple[-1] is not None:
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        return k_upsample(hidden_states) if self.add_upsample else hidden_states


class KCrossAttnUpBlock2D(nn.Module):
    """[hidden, last skip] -> ``num_layers - 1`` (resnet, attention block) pairs, then an optional blur upsample.

    Which stage this is, is read off the widths, as the k-diffusion layout implies: the bottom one (``in ==
    out == temb_channels``) gets no skip and adds self-attention; a stage that changes the width does so in the
    second conv of its last resnet.
    """

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 4, resnet_eps: float = 1e-5, resnet_act_fn: str = "gelu",
                 attention_head_dim: int = 1, cross_attention_dim: int = 768, add_upsample: bool = True,
                 upcast_attention: bool = False):
        super().__init__()
        is_bottom = in_channels == out_channels == temb_channels
        narrows = in_channels != out_channels
        n = num_layers - 1
        resnets, attentions = [], []
        for i in range(n):
            block_in = (out_channels if is_bottom else 2 * out_channels) if i == 0 else out_channels
            width = in_channels if narrows and i == n - 1 else out_channels
            resnets.append(_resnet(block_in, out_channels, temb_channels, resnet_eps, resnet_act_fn, dropout,
                                   conv_2d_out_channels=width))
            attentions.append(KAttentionBlock(width, width // attention_head_dim, attention_head_dim,
                                              cross_attention_dim, temb_channels, add_self_attention=is_bottom,
                                              upcast_attention=upcast_attention))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.add_upsample = add_upsample

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None,
                encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None,
                cross_attention_kwargs=None):
        if res_hidden_states_tuple[-1] is not None:
            hidden_states = torch.cat([hidden_states, res_hidden_states_tuple[-1]], dim=1)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), encoder_hidden_states=encoder_hidden_states, emb=temb,
                                 attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                                 cross_attention_kwargs=cross_attention_kwargs)
        return k_upsample(hidden_states) if self.add_upsample else hidden_states
