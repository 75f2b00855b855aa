"""The unconditional / class-conditional UNet of DDPM, improved DDPM and score-SDE (NCSN++), in diffusers'
layout.

noise level -> embedding (sinusoidal, Gaussian Fourier or learned) -> MLP, plus an optional class embedding;
image -> conv_in -> down stages (keeping skips) -> mid block -> up stages (eating skips) -> norm, act, conv_out.
NCSN++ "skip" stages also carry an image-resolution side path, summed into the output at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from diffloom.configuration import register_to_config
from diffloom.modeling import ModelMixin
from diffloom.outputs import BaseOutput

from .attention import AttentionProcessorMixin
from .blocks import (AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, GaussianFourierProjection, ResnetBlock2D,
                     ResnetDownsampleBlock2D, ResnetUpsampleBlock2D, TimestepEmbedding, Timesteps, UNetMidBlock2D,
                     UpBlock2D, fir_downsample, fir_upsample, rename_legacy_attention_keys, spatial_attention)


@dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor


# -- NCSN++ stages: a side path at image resolution, resampled with the FIR blur ----------------------------


def _quarter_groups(channels: int) -> int:
    return min(channels // 4, 32)


class SkipDownBlock2D(nn.Module):
    """Resnets (optionally with attention); when downsampling, a FIR resnet halves the features and the
    image-resolution side input is FIR-halved too and added back through a 1x1 conv."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, eps, act_fn, time_scale_shift,
                 dropout, add_downsample, with_attention=False, attention_head_dim=None):
        super().__init__()
        # NCSN++ scales every residual sum by 1/sqrt(2) to keep activations at unit variance.
        common = dict(temb_channels=temb_channels, eps=eps, non_linearity=act_fn, dropout=dropout,
                      time_embedding_norm=time_scale_shift, output_scale_factor=math.sqrt(2.0))
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          groups=_quarter_groups(in_channels if i == 0 else out_channels),
                          groups_out=_quarter_groups(out_channels), **common)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(spatial_attention(out_channels, attention_head_dim, 32, eps, math.sqrt(2.0))
                                        for _ in range(num_layers)) if with_attention else None
        if add_downsample:
            self.resnet_down = ResnetBlock2D(in_channels=out_channels, out_channels=out_channels,
                                             groups=_quarter_groups(out_channels), use_in_shortcut=True, down=True,
                                             kernel="fir", **common)
            self.skip_conv = nn.Conv2d(3, out_channels, kernel_size=1)
        else:
            self.resnet_down = self.skip_conv = None

    def forward(self, hidden_states, temb, skip_sample):
        skips = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            skips += (hidden_states,)
        if self.resnet_down is not None:
            hidden_states = self.resnet_down(hidden_states, temb)
            skip_sample = fir_downsample(skip_sample)
            hidden_states = self.skip_conv(skip_sample) + hidden_states
            skips += (hidden_states,)
        return hidden_states, skips, skip_sample


class SkipUpBlock2D(nn.Module):
    """Resnets on [hidden, skip] (the attention variant adds one self-attention after them); the side path is
    FIR-doubled, and when upsampling it receives a 3-channel projection of the features."""

    def __init__(self, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, eps, act_fn,
                 time_scale_shift, dropout, add_upsample, with_attention=False, attention_head_dim=None):
        super().__init__()
        common = dict(temb_channels=temb_channels, eps=eps, non_linearity=act_fn, dropout=dropout,
                      time_embedding_norm=time_scale_shift, output_scale_factor=math.sqrt(2.0))
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            block_in = prev_output_channel if i == 0 else out_channels
            # The attention variant's checkpoints were trained with min(block_in + skip // 4, 32) groups (an
            # operator-precedence slip upstream); the plain one with min((block_in + skip) // 4, 32).
            groups = min(block_in + skip // 4, 32) if with_attention else _quarter_groups(block_in + skip)
            resnets.append(ResnetBlock2D(in_channels=block_in + skip, out_channels=out_channels, groups=groups,
                                         groups_out=_quarter_groups(out_channels), **common))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList([spatial_attention(out_channels, attention_head_dim, 32, eps,
                                                           math.sqrt(2.0))]) if with_attention else None
        if add_upsample:
            self.resnet_up = ResnetBlock2D(in_channels=out_channels, out_channels=out_channels,
                                           groups=_quarter_groups(out_channels),
                                           groups_out=_quarter_groups(out_channels), use_in_shortcut=True, up=True,
                                           kernel="fir", **common)
            self.skip_conv = nn.Conv2d(out_channels, 3, kernel_size=3, padding=1)
            self.skip_norm = nn.GroupNorm(_quarter_groups(out_channels), out_channels, eps=eps)
            self.act = nn.SiLU()
        else:
            self.resnet_up = self.skip_conv = self.skip_norm = self.act = None

    def forward(self, hidden_states, res_hidden_states_tuple, temb, skip_sample):
        for resnet in self.resnets:
            *res_hidden_states_tuple, skip = res_hidden_states_tuple
            hidden_states = resnet(torch.cat([hidden_states, skip], dim=1), temb)
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        skip_sample = fir_upsample(skip_sample) if skip_sample is not None else 0
        if self.resnet_up is not None:
            skip_sample = skip_sample + self.skip_conv(self.act(self.skip_norm(hidden_states)))
            hidden_states = self.resnet_up(hidden_states, temb)
        return hidden_states, skip_sample


_SKIP_BLOCKS = (SkipDownBlock2D, SkipUpBlock2D)


def _down_block(block_type, *, num_layers, in_channels, out_channels, temb_channels, add_downsample, eps, act_fn,
                groups, attention_head_dim, downsample_padding, time_scale_shift, downsample_type, dropout):
    block_type = block_type.removeprefix("UNetRes")
    common = dict(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels,
                  num_layers=num_layers, dropout=dropout)
    resnet = dict(resnet_eps=eps, resnet_act_fn=act_fn, resnet_groups=groups, resnet_time_scale_shift=time_scale_shift)
    if block_type == "DownBlock2D":
        return DownBlock2D(**common, **resnet, add_downsample=add_downsample, downsample_padding=downsample_padding)
    if block_type == "ResnetDownsampleBlock2D":
        return ResnetDownsampleBlock2D(**common, **resnet, add_downsample=add_downsample)
    if block_type == "AttnDownBlock2D":
        return AttnDownBlock2D(**common, **resnet, attention_head_dim=attention_head_dim,
                               downsample_padding=downsample_padding,
                               downsample_type=(downsample_type or "conv") if add_downsample else None)
    if block_type in ("SkipDownBlock2D", "AttnSkipDownBlock2D"):
        return SkipDownBlock2D(**common, eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift,
                               add_downsample=add_downsample, with_attention=block_type.startswith("Attn"),
                               attention_head_dim=attention_head_dim)
    raise ValueError(f"down_block_types entry {block_type!r} is not supported by UNet2DModel; use DownBlock2D, "
                     f"AttnDownBlock2D, ResnetDownsampleBlock2D, SkipDownBlock2D or AttnSkipDownBlock2D")


def _up_block(block_type, *, num_layers, in_channels, prev_output_channel, out_channels, temb_channels, add_upsample,
              eps, act_fn, groups, attention_head_dim, time_scale_shift, upsample_type, dropout):
    block_type = block_type.removeprefix("UNetRes")
    common = dict(in_channels=in_channels, prev_output_channel=prev_output_channel, out_channels=out_channels,
                  temb_channels=temb_channels, num_layers=num_layers, dropout=dropout)
    resnet = dict(resnet_eps=eps, resnet_act_fn=act_fn, resnet_groups=groups, resnet_time_scale_shift=time_scale_shift)
    if block_type == "UpBlock2D":
        return UpBlock2D(**common, **resnet, add_upsample=add_upsample)
    if block_type == "ResnetUpsampleBlock2D":
        return ResnetUpsampleBlock2D(**common, **resnet, add_upsample=add_upsample)
    if block_type == "AttnUpBlock2D":
        return AttnUpBlock2D(**common, **resnet, attention_head_dim=attention_head_dim,
                             upsample_type=(upsample_type or "conv") if add_upsample else None)
    if block_type in ("SkipUpBlock2D", "AttnSkipUpBlock2D"):
        return SkipUpBlock2D(**common, eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift,
                             add_upsample=add_upsample, with_attention=block_type.startswith("Attn"),
                             attention_head_dim=attention_head_dim)
    raise ValueError(f"up_block_types entry {block_type!r} is not supported by UNet2DModel; use UpBlock2D, "
                     f"AttnUpBlock2D, ResnetUpsampleBlock2D, SkipUpBlock2D or AttnSkipUpBlock2D")


class UNet2DModel(ModelMixin, AttentionProcessorMixin):
    """Predicts noise (or the score, for NCSN++) from a noisy image, a timestep and optional class labels."""

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int | None = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        if not len(down_block_types) == len(up_block_types) == len(block_out_channels):
            raise ValueError(f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) "
                             f"and block_out_channels ({len(block_out_channels)}) must have the same length")
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise ValueError(f"mid_block_type={mid_block_type!r}: UNet2DModel supports 'UNetMidBlock2D' or None")
        base = block_out_channels[0]
        time_embed_dim = time_embedding_dim or base * 4

        self.conv_in = nn.Conv2d(in_channels, base, kernel_size=3, padding=1)

        if time_embedding_type == "positional":
            self.time_proj = Timesteps(base, flip_sin_to_cos, freq_shift)
            time_input_dim = base
        elif time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=base, scale=16)
            time_input_dim = 2 * base
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ValueError("time_embedding_type='learned' needs num_train_timesteps (the embedding table size)")
            self.time_proj = nn.Embedding(num_train_timesteps, base)
            time_input_dim = base
        else:
            raise ValueError(f"time_embedding_type={time_embedding_type!r} is not 'positional', 'fourier' or "
                             f"'learned'")
        self.time_embedding = TimestepEmbedding(time_input_dim, time_embed_dim)

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(time_input_dim, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"class_embed_type={class_embed_type!r} is not None, 'timestep' or 'identity'")

        def head_dim(channels):
            return attention_head_dim if attention_head_dim is not None else channels

        shared = dict(temb_channels=time_embed_dim, eps=norm_eps, act_fn=act_fn, groups=norm_num_groups,
                      time_scale_shift=resnet_time_scale_shift, dropout=dropout)
        self.down_blocks = nn.ModuleList()
        channels = base
        for i, block_type in enumerate(down_block_types):
            out = block_out_channels[i]
            self.down_blocks.append(_down_block(
                block_type, num_layers=layers_per_block, in_channels=channels, out_channels=out,
                add_downsample=i < len(block_out_channels) - 1, attention_head_dim=head_dim(out),
                downsample_padding=downsample_padding, downsample_type=downsample_type, **shared))
            channels = out
        # Registered before the middle block, as diffusers does: module, state-dict and attn_processors order
        # then match (IP-Adapter files number attention layers in that order).
        self.up_blocks = nn.ModuleList()

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                block_out_channels[-1], temb_channels=time_embed_dim, dropout=dropout, resnet_eps=norm_eps,
                resnet_act_fn=act_fn, output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift, attention_head_dim=head_dim(block_out_channels[-1]),
                resnet_groups=norm_num_groups, attn_groups=attn_norm_num_groups, add_attention=add_attention)

        reversed_channels = list(reversed(block_out_channels))
        prev = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            out = reversed_channels[i]
            skip_in = reversed_channels[min(i + 1, len(block_out_channels) - 1)]
            self.up_blocks.append(_up_block(
                block_type, num_layers=layers_per_block + 1, in_channels=skip_in, prev_output_channel=prev,
                out_channels=out, add_upsample=i < len(block_out_channels) - 1, attention_head_dim=head_dim(out),
                upsample_type=upsample_type, **shared))
            prev = out

        groups_out = norm_num_groups if norm_num_groups is not None else _quarter_groups(base)
        self.conv_norm_out = nn.GroupNorm(groups_out, base, eps=norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(base, out_channels, kernel_size=3, padding=1)

    def load_weights(self, state_dict: dict, source="state dict", dtype=None):
        super().load_weights(rename_legacy_attention_keys(self, state_dict), source=source, dtype=dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None, return_dict: bool = True):
        """``sample`` (B, C, H, W) with H and W multiples of 2 ** (stages - 1); ``timestep`` a number, a 0-d
        tensor or one per batch item (noise levels sigma for ``time_embedding_type="fourier"``)."""
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(f"sample of size {tuple(sample.shape[-2:])}: UNet2DModel needs height and width that "
                             f"are multiples of {factor} (2 ** (number of stages - 1))")
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        # A plain number becomes an integer timestep (as upstream does); tensors keep their dtype.
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long)
        timesteps = timestep.reshape(-1).to(sample.device).expand(sample.shape[0])

        emb = self.time_embedding(self.time_proj(timesteps).to(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet2DModel is class-conditional: pass class_labels (one per batch item)")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(self.dtype)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this UNet2DModel has no class embedding (set "
                             "num_class_embeds or class_embed_type in its config)")

        skip_sample = sample
        sample = self.conv_in(sample)
        res_samples = (sample,)
        for block in self.down_blocks:
            if isinstance(block, _SKIP_BLOCKS):
                sample, skips, skip_sample = block(sample, emb, skip_sample)
            else:
                sample, skips = block(sample, emb)
            res_samples += skips

        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)

        skip_sample = None
        for block in self.up_blocks:
            n = len(block.resnets)
            skips, res_samples = res_samples[-n:], res_samples[:-n]
            if isinstance(block, _SKIP_BLOCKS):
                sample, skip_sample = block(sample, skips, emb, skip_sample)
            else:
                sample = block(sample, skips, emb)

        sample = self.conv_out(self.conv_act(self.conv_norm_out(sample)))
        if skip_sample is not None:
            sample = sample + skip_sample
        if self.config.time_embedding_type == "fourier":
            # NCSN++ predicts the score: the network output divided by the noise level.
            sample = sample / timesteps.reshape(-1, 1, 1, 1)
        return UNet2DOutput(sample=sample) if return_dict else (sample,)
