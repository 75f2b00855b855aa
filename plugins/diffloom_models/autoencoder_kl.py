"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), in diffusers' layout.

The encoder maps an image to the mean and log-variance of a diagonal Gaussian over latents (8x smaller for
the usual four stages); the decoder maps a latent back to an image. Large images can be processed in
overlapping tiles whose seams are blended linearly, and large batches one item at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffloom.configuration import register_to_config
from diffloom.modeling import ModelMixin
from diffloom.outputs import BaseOutput
from diffloom.randomness import randn_tensor

from .attention import AttentionProcessorMixin
from .blocks import (Downsample2D, ResnetBlock2D, UNetMidBlock2D, Upsample2D, rename_legacy_attention_keys,
                     spatial_attention)


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element; ``parameters`` holds mean and logvar stacked on the channels."""

    def __init__(self, parameters: torch.Tensor):
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        # Clamped so that exp() stays finite and the variance never collapses to exactly zero.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        noise = randn_tensor(self.mean.shape, generator=generator, device=self.parameters.device,
                             dtype=self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) per batch item; ``other`` defaults to the standard normal."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims=(1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        log_two_pi = 1.8378770664093453  # log(2 * pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


# -- encoder / decoder stages (no time embedding) -------------------------------------------------------------


class DownEncoderBlock2D(nn.Module):
    """Resnets (optionally each followed by self-attention), then an optional downsampling conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_downsample: bool, with_attention: bool = False, eps: float = 1e-6):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, groups=groups, eps=eps, non_linearity=act_fn)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(spatial_attention(out_channels, out_channels, groups, eps)
                                        for _ in range(num_layers)) if with_attention else None
        # The LDM encoder pads right/bottom only before its stride-2 conv (padding=0).
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=0)]) \
            if add_downsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """Resnets (optionally each followed by self-attention), then an optional nearest-x2 + conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, act_fn: str,
                 add_upsample: bool, with_attention: bool = False, eps: float = 1e-6):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, groups=groups, eps=eps, non_linearity=act_fn)
            for i in range(num_layers))
        self.attentions = nn.ModuleList(spatial_attention(out_channels, out_channels, groups, eps)
                                        for _ in range(num_layers)) if with_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


_DOWN_BLOCKS = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_BLOCKS = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def _has_attention(block_type: str, known: dict, key: str) -> bool:
    if block_type not in known:
        raise ValueError(f"{key} entry {block_type!r} is not supported by AutoencoderKL; use one of {list(known)}")
    return known[block_type]


class Encoder(nn.Module):
    def __init__(self, in_channels, out_channels, down_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, act_fn, mid_block_add_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            out = block_out_channels[i]
            self.down_blocks.append(DownEncoderBlock2D(
                channels, out, layers_per_block, norm_num_groups, act_fn,
                add_downsample=i < len(block_out_channels) - 1,
                with_attention=_has_attention(block_type, _DOWN_BLOCKS, "down_block_types")))
            channels = out
        self.mid_block = UNetMidBlock2D(channels, temb_channels=None, resnet_eps=1e-6, resnet_act_fn=act_fn,
                                        resnet_groups=norm_num_groups, attention_head_dim=channels,
                                        add_attention=mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.conv_act = nn.SiLU()
        # Twice the latent channels: mean and log-variance.
        self.conv_out = nn.Conv2d(channels, 2 * out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    def __init__(self, in_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                 norm_num_groups, act_fn, mid_block_add_attention):
        super().__init__()
        channels = block_out_channels[-1]
        self.conv_in = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(channels, temb_channels=None, resnet_eps=1e-6, resnet_act_fn=act_fn,
                                        resnet_groups=norm_num_groups, attention_head_dim=channels,
                                        add_attention=mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        for i, block_type in enumerate(up_block_types):
            out = reversed_channels[i]
            self.up_blocks.append(UpDecoderBlock2D(
                channels, out, layers_per_block + 1, norm_num_groups, act_fn,
                add_upsample=i < len(block_out_channels) - 1,
                with_attention=_has_attention(block_type, _UP_BLOCKS, "up_block_types")))
            channels = out
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


# -- the model -------------------------------------------------------------------------------------------------


def _blend(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """Cross-fade the first ``extent`` rows (dim 2) or columns (dim 3) of ``tile`` from ``previous``'s last
    ones, in place: weight 1 on ``previous`` at the seam's start, falling linearly towards ``tile``."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    w_tile = ramp.to(tile.device, tile.dtype).view(shape)
    w_prev = (1 - ramp).to(tile.device, tile.dtype).view(shape)
    head = tile.narrow(dim, 0, extent)
    head.copy_(previous.narrow(dim, previous.shape[dim] - extent, extent) * w_prev + head * w_tile)


def _tiled(x: torch.Tensor, tile_in: int, tile_out: int, overlap_factor: float, fn) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile_in``-sized tiles of ``x`` (stride ``tile_in * (1 - overlap)``), blend
    each output tile into its upper and left neighbours over ``tile_out * overlap`` pixels, and stitch."""
    stride = int(tile_in * (1 - overlap_factor))
    blend = int(tile_out * overlap_factor)
    keep = tile_out - blend
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    # Neighbours are read after their own blending, so blending proceeds in raster order.
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, dim=2)
            if j > 0:
                _blend(row[j - 1], tile, blend, dim=3)
    return torch.cat([torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in rows], dim=2)


class AutoencoderKL(ModelMixin, AttentionProcessorMixin):
    """Image <-> latent VAE. ``scaling_factor`` (and ``shift_factor``) are read by pipelines, which scale
    latents as ``(z - shift) * scale`` before diffusion; ``force_upcast`` asks them to run the VAE in float32."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError(f"down_block_types ({len(down_block_types)}), up_block_types ({len(up_block_types)}) "
                             f"and block_out_channels ({len(block_out_channels)}) must have the same length")
        self.encoder = Encoder(in_channels, latent_channels, down_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, up_block_types, block_out_channels, layers_per_block,
                               norm_num_groups, act_fn, mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        # Tiles are as large as the images the VAE was trained on; neighbouring tiles overlap by a quarter.
        self.tile_sample_min_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_latent_min_size = int(self.tile_sample_min_size / 2 ** (len(block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    def load_weights(self, state_dict: dict, source="state dict", dtype=None):
        super().load_weights(rename_legacy_attention_keys(self, state_dict), source=source, dtype=dtype)

    # -- memory switches ---------------------------------------------------------------------------------------

    def enable_slicing(self):
        """Encode and decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self):
        """Encode and decode images larger than ``sample_size`` in overlapping tiles."""
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    # -- encoding ------------------------------------------------------------------------------------------------

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_conv is not None:
            return self.quant_conv(self.encoder(x))
        return self.encoder(x)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return _tiled(x, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor,
                          self._encode_moments)
        return self._encode_moments(x)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images (B, C, H, W) in [-1, 1] -> ``.latent_dist``, a ``DiagonalGaussianDistribution``."""
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(item) for item in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_encode(self, x: torch.Tensor, return_dict: bool = True):
        """``encode`` in tiles, whatever the image size."""
        moments = _tiled(x, self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor,
                         self._encode_moments)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # -- decoding ------------------------------------------------------------------------------------------------

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self.tiled_decode(z, return_dict=False)[0]
        return self._decode_tile(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents (unscaled: divide by ``scaling_factor`` first) -> ``.sample``, images in about [-1, 1].
        ``generator`` is accepted for signature compatibility; decoding draws no noise."""
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(item) for item in z.split(1)])
        else:
            decoded = self._decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True):
        """``decode`` in tiles, whatever the latent size."""
        decoded = _tiled(z, self.tile_latent_min_size, self.tile_sample_min_size, self.tile_overlap_factor,
                         self._decode_tile)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """Reconstruct ``sample``: encode, take the posterior's mode (or a draw), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
