"""Building blocks shared by the UNets and the VAE.

Other model files may import from here:

- ``activation(name)``: "silu"/"swish", "mish", "gelu", "relu" as a module;
- ``timestep_embedding(...)``, ``Timesteps``, ``GaussianFourierProjection``, ``TimestepEmbedding``: turning a
  timestep (or noise level) into a vector;
- ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``, ``fir_downsample``, ``fir_upsample``;
- ``spatial_attention(channels, head_dim, groups, eps)``: the GroupNorm'd, residual self-attention over pixels
  used by the VAE and UNet2D stages (an ``Attention`` from attention.py);
- the plain UNet stages ``DownBlock2D``, ``UpBlock2D``, ``AttnDownBlock2D``, ``AttnUpBlock2D``,
  ``ResnetDownsampleBlock2D``, ``ResnetUpsampleBlock2D`` and ``UNetMidBlock2D``;
- ``rename_legacy_attention_keys(model, state_dict)``: old checkpoints name the spatial self-attention
  ``query/key/value/proj_attn``; this maps them to ``to_q/to_k/to_v/to_out.0``.

Down blocks return ``(hidden_states, skip_states)``; up blocks take ``(hidden_states, skip_states, temb,
upsample_size)`` and consume skips from the end. Module names are diffusers' so state dicts load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, dropout_layer

_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not one of {sorted(_ACTIVATIONS)}") from None


# -- timestep embeddings ---------------------------------------------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D batch of (possibly fractional) timesteps, as in DDPM / "Attention is all
    you need": frequencies fall geometrically from 1 to 1/max_period over the first half of ``dim``."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (one per batch item), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """``timestep_embedding`` as a (weightless) module."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift,
                                  self.scale)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (log) noise level, as in score-SDE models. The frequencies are a frozen,
    saved parameter (``weight``)."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = True,
                 flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        angles = x[:, None] * self.weight[None, :] * 2 * math.pi
        sin, cos = torch.sin(angles), torch.cos(angles)
        return torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on top of the sinusoidal features; ``cond_proj`` adds an extra condition (LCM's guidance
    embedding) to its input, ``post_act`` is an optional activation on its output."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu", out_dim: int | None = None,
                 post_act_fn: str | None = None, cond_proj_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond was given but this model has no time_cond_proj_dim (no projection "
                                 "for it); drop timestep_cond or use a model built with time_cond_proj_dim")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample


# -- resampling ------------------------------------------------------------------------------------------------


def _fir_kernel(x: torch.Tensor, gain: float) -> torch.Tensor:
    """The separable [1, 3, 3, 1] blur of StyleGAN2 / NCSN++, normalised to sum to ``gain``, one per channel."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps)
    kernel = kernel / kernel.sum() * gain
    return kernel.to(x.device, x.dtype).expand(x.shape[1], 1, 4, 4)


def fir_downsample(x: torch.Tensor) -> torch.Tensor:
    """Blur with the FIR kernel, then keep every second pixel (anti-aliased halving)."""
    # Contiguous, so the convs that follow see the memory layout they see in diffusers (a channels-last input
    # makes them pick another algorithm, with last-bit differences).
    return F.conv2d(F.pad(x, (1, 1, 1, 1)).contiguous(), _fir_kernel(x, 1.0), stride=2, groups=x.shape[1])


def fir_upsample(x: torch.Tensor) -> torch.Tensor:
    """Insert a zero after every pixel, then blur with the FIR kernel (gain 4 keeps the mean level)."""
    b, c, h, w = x.shape
    spread = x.new_zeros(b, c, h, 2, w, 2)
    spread[:, :, :, 0, :, 0] = x
    spread = F.pad(spread.view(b, c, 2 * h, 2 * w), (2, 1, 2, 1))
    return F.conv2d(spread, _fir_kernel(x, 4.0), groups=c)


class Downsample2D(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (key ``conv``) or, without ``use_conv``, 2x2 average pooling.

    ``padding=0`` pads only right and bottom, as the original LDM/VAE encoders do.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.padding = padding
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample2D without a conv cannot change channels ({channels} -> {out_channels})")
        else:
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double the resolution (nearest neighbour), then an optional 3x3 conv (key ``conv``).

    ``output_size`` forces the interpolated size, for skips of odd size coming from the down path.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states


# -- the residual block ----------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv -> (+ time embedding) -> GroupNorm -> act -> dropout -> conv, plus the input.

    ``time_embedding_norm="scale_shift"`` lets the embedding scale and shift the second norm's output
    (improved DDPM) instead of being added before it. ``up``/``down`` resample both branches between the first
    activation and conv: nearest/avg-pool, or the FIR blur with ``kernel="fir"`` (NCSN++). ``temb_channels=None``
    builds a block without time conditioning (the VAE's). The sum is divided by ``output_scale_factor``.
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 temb_channels: int | None = 512, groups: int = 32, groups_out: int | None = None, eps: float = 1e-6,
                 non_linearity: str = "swish", skip_time_act: bool = False, time_embedding_norm: str = "default",
                 kernel: str | None = None, output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None,
                 up: bool = False, down: bool = False, conv_shortcut_bias: bool = True):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm={time_embedding_norm!r}: ResnetBlock2D supports 'default' and "
                             f"'scale_shift'")
        if kernel not in (None, "fir"):
            raise ValueError(f"kernel={kernel!r}: ResnetBlock2D resamples with nearest/avg-pool (None) or 'fir'")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.skip_time_act = skip_time_act
        self.output_scale_factor = output_scale_factor
        self.resample = "up" if up else "down" if down else None
        self.fir = kernel == "fir"

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = activation(non_linearity)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=conv_shortcut_bias)
                              if use_in_shortcut else None)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return fir_upsample(x) if self.fir else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return fir_downsample(x) if self.fir else F.avg_pool2d(x, kernel_size=2, stride=2)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.nonlinearity(self.norm1(input_tensor))
        if self.resample is not None:
            input_tensor = self._resample(input_tensor)
            hidden_states = self._resample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        else:
            temb = None

        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("this ResnetBlock2D uses time_embedding_norm='scale_shift' and needs temb")
            scale, shift = temb.chunk(2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + scale) + shift
        else:
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)

        hidden_states = self.conv2(self.dropout(self.nonlinearity(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        output = input_tensor + hidden_states
        return output / self.output_scale_factor if self.output_scale_factor != 1 else output


def spatial_attention(channels: int, head_dim: int | None, groups: int | None, eps: float,
                      rescale_output_factor: float = 1.0) -> Attention:
    """Self-attention over the pixels of a feature map, with its own GroupNorm and a residual connection."""
    head_dim = head_dim or channels
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, bias=True, norm_num_groups=groups,
                     eps=eps, rescale_output_factor=rescale_output_factor, residual_connection=True)


def rename_legacy_attention_keys(model: nn.Module, state_dict: dict) -> dict:
    """Checkpoints written before the attention rewrite name the spatial attention's projections
    ``query``/``key``/``value``/``proj_attn``; give them today's names. Other keys are left alone."""
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    prefixes = [name + "." if name else "" for name, module in model.named_modules() if isinstance(module, Attention)]
    renamed = dict(state_dict)
    for prefix in prefixes:
        for old, new in legacy.items():
            for kind in ("weight", "bias"):
                key = f"{prefix}{old}.{kind}"
                if key in renamed:
                    renamed[f"{prefix}{new}.{kind}"] = renamed.pop(key)
    return renamed


# -- UNet stages -----------------------------------------------------------------------------------------------


def _resnet_stack(num_layers, in_channels, out_channels, temb_channels, prev_output_channel=None,
                  **resnet_kwargs) -> nn.ModuleList:
    """``num_layers`` resnets. Down path: the first takes ``in_channels``. Up path (``prev_output_channel``
    given): resnet i takes the previous output concatenated with a skip; the last skip has ``in_channels``."""
    blocks = []
    for i in range(num_layers):
        if prev_output_channel is None:
            block_in = in_channels if i == 0 else out_channels
        else:
            skip = in_channels if i == num_layers - 1 else out_channels
            block_in = (prev_output_channel if i == 0 else out_channels) + skip
        blocks.append(ResnetBlock2D(in_channels=block_in, out_channels=out_channels, temb_channels=temb_channels,
                                    **resnet_kwargs))
    return nn.ModuleList(blocks)


def _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift, output_scale_factor,
                   skip_time_act=False) -> dict:
    return dict(dropout=dropout, eps=resnet_eps, non_linearity=resnet_act_fn, groups=resnet_groups,
                time_embedding_norm=resnet_time_scale_shift, output_scale_factor=output_scale_factor,
                skip_time_act=skip_time_act)


class DownBlock2D(nn.Module):
    """Resnets, then an optional stride-2 conv. Every resnet output and the downsampled map are skips."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor)
        self.resnets = _resnet_stack(num_layers, in_channels, out_channels, temb_channels, **kw)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)]) \
            if add_downsample else None

    def forward(self, hidden_states, temb=None):
        skips = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class ResnetDownsampleBlock2D(nn.Module):
    """DownBlock2D whose downsampler is itself a resnet with ``down=True`` (BigGAN style)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, skip_time_act: bool = False):
        super().__init__()
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor, skip_time_act)
        self.resnets = _resnet_stack(num_layers, in_channels, out_channels, temb_channels, **kw)
        self.downsamplers = nn.ModuleList([ResnetBlock2D(in_channels=out_channels, temb_channels=temb_channels,
                                                         down=True, **kw)]) if add_downsample else None

    def forward(self, hidden_states, temb=None):
        skips = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            skips += (hidden_states,)
        return hidden_states, skips


class AttnDownBlock2D(nn.Module):
    """Resnet + self-attention pairs, then a conv (``downsample_type="conv"``) or resnet (``"resnet"``)
    downsampler, or none (``None``)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int = 32, attention_head_dim: int | None = 1,
                 output_scale_factor: float = 1.0, downsample_padding: int = 1, downsample_type: str | None = "conv"):
        super().__init__()
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor)
        self.resnets = _resnet_stack(num_layers, in_channels, out_channels, temb_channels, **kw)
        self.attentions = nn.ModuleList(
            spatial_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers))
        self.downsample_type = downsample_type
        if downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
        elif downsample_type == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(in_channels=out_channels, temb_channels=temb_channels,
                                                             down=True, **kw)])
        elif downsample_type is None:
            self.downsamplers = None
        else:
            raise ValueError(f"downsample_type={downsample_type!r} is not 'conv', 'resnet' or None")

    def forward(self, hidden_states, temb=None):
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb))
            skips += (hidden_states,)
        if self.downsamplers is not None:
            if self.downsample_type == "resnet":
                hidden_states = self.downsamplers[0](hidden_states, temb)
            else:
                hidden_states = self.downsamplers[0](hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class UpBlock2D(nn.Module):
    """Resnets on [hidden, skip] concatenations, then an optional nearest-x2 + conv upsampler."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True):
        super().__init__()
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor)
        self.resnets = _resnet_stack(num_layers, in_channels, out_channels, temb_channels,
                                     prev_output_channel, **kw)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet in self.resnets:
            *res_hidden_states_tuple, skip = res_hidden_states_tuple
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class ResnetUpsampleBlock2D(nn.Module):
    """UpBlock2D whose upsampler is a resnet with ``up=True``."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True, skip_time_act: bool = False):
        super().__init__()
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor, skip_time_act)
        self.resnets = _resnet_stack(num_layers, in_channels, out_channels, temb_channels,
                                     prev_output_channel, **kw)
        self.upsamplers = nn.ModuleList([ResnetBlock2D(in_channels=out_channels, temb_channels=temb_channels,
                                                       up=True, **kw)]) if add_upsample else None

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet in self.resnets:
            *res_hidden_states_tuple, skip = res_hidden_states_tuple
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class AttnUpBlock2D(nn.Module):
    """Resnet + self-attention pairs on [hidden, skip] concatenations, then a conv/resnet upsampler or none."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 attention_head_dim: int | None = 1, output_scale_factor: float = 1.0,
                 upsample_type: str | None = "conv"):
        super().__init__()
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor)
        self.resnets = _resnet_stack(num_layers, in_channels, out_channels, temb_channels,
                                     prev_output_channel, **kw)
        self.attentions = nn.ModuleList(
            spatial_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers))
        self.upsample_type = upsample_type
        if upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)])
        elif upsample_type == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(in_channels=out_channels, temb_channels=temb_channels,
                                                           up=True, **kw)])
        elif upsample_type is None:
            self.upsamplers = None
        else:
            raise ValueError(f"upsample_type={upsample_type!r} is not 'conv', 'resnet' or None")

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            *res_hidden_states_tuple, skip = res_hidden_states_tuple
            hidden_states = attn(resnet(torch.cat([hidden_states, skip], dim=1), temb))
        if self.upsamplers is not None:
            if self.upsample_type == "resnet":
                hidden_states = self.upsamplers[0](hidden_states, temb)
            else:
                hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """resnet, then ``num_layers`` x (self-attention, resnet) at the lowest resolution.

    ``resnet_groups=None`` means min(channels / 4, 32). The attention's GroupNorm uses ``attn_groups``, which
    defaults to the resnet groups for ``resnet_time_scale_shift="default"`` and to no norm otherwise.
    """

    def __init__(self, in_channels: int, temb_channels: int | None, dropout: float = 0.0, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish",
                 resnet_groups: int | None = 32, attn_groups: int | None = None, add_attention: bool = True,
                 attention_head_dim: int | None = 1, output_scale_factor: float = 1.0):
        super().__init__()
        if resnet_groups is None:
            resnet_groups = min(in_channels // 4, 32)
        if attn_groups is None and resnet_time_scale_shift == "default":
            attn_groups = resnet_groups
        kw = _resnet_kwargs(dropout, resnet_eps, resnet_act_fn, resnet_groups, resnet_time_scale_shift,
                            output_scale_factor)
        self.resnets = nn.ModuleList(ResnetBlock2D(in_channels=in_channels, temb_channels=temb_channels, **kw)
                                     for _ in range(num_layers + 1))
        self.attentions = nn.ModuleList(
            spatial_attention(in_channels, attention_head_dim, attn_groups, resnet_eps, output_scale_factor)
            for _ in range(num_layers)) if add_attention else None

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states
