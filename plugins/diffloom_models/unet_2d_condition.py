"""The conditional UNet of latent diffusion (Stable Diffusion 1.x / 2.x, SDXL, LCM, inpainting, unCLIP, upscalers,
DeepFloyd IF, Kandinsky 2.x, GLIGEN).

Shape of the network: ``conv_in``; a down path of stages (resnets, each optionally followed by a spatial
transformer that cross-attends to the text, then a stride-2 conv) whose every output is kept as a skip; a
middle stage; an up path that concatenates the skips back in reverse order; ``conv_norm_out`` / ``conv_out``.
Every resnet also receives one conditioning vector ``emb``: the sinusoidal timestep embedding through an MLP,
plus optional class / SDXL "text_time" / IF and Kandinsky text or image / LCM guidance embeddings. Other stage
kinds live in blocks.py (plain attention, BigGAN resampling), simple_cross_attention.py (unCLIP, IF,
Kandinsky) and k_unet.py (the SD x2 latent upscaler); the extra embeddings in embeddings.py.

Config keys, defaults and state-dict names are diffusers' ``UNet2DConditionModel``'s, so folders move both ways.
One naming quirk is inherited on purpose: ``attention_head_dim`` in these configs is the number of heads per
stage for spatial transformers (head width = channels / heads), but the head width for the other attention
stages. ``ControlNetModel`` (controlnet.py) reuses the embeddings and stages here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffloom.configuration import register_to_config
from diffloom.modeling import ModelMixin
from diffloom.outputs import BaseOutput

from .attention import AttentionProcessorMixin
from .blocks import (AttnDownBlock2D, AttnUpBlock2D, DownBlock2D, GaussianFourierProjection, ResnetDownsampleBlock2D,
                     ResnetUpsampleBlock2D, TimestepEmbedding, Timesteps, UNetMidBlock2D, UpBlock2D, activation)
from .embeddings import (GLIGENTextBoundingboxProjection, ImageHintTimeEmbedding, ImageProjection,
                         ImageTimeEmbedding, TextImageProjection, TextImageTimeEmbedding, TextTimeEmbedding)
from .k_unet import KCrossAttnDownBlock2D, KCrossAttnUpBlock2D, KDownBlock2D, KUpBlock2D
from .simple_cross_attention import (SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D,
                                     UNetMidBlock2DSimpleCrossAttn)
from .transformer import SpatialTransformer, mask_to_bias


@dataclass
class UNet2DConditionOutput(BaseOutput):
    sample: torch.Tensor = None


# -- stages with cross-attention ---------------------------------------------------------------------------------


def _spatial_transformers(channels, heads, layers, num_resnets, groups, cross_attention_dim,
                          use_linear_projection, only_cross_attention, upcast_attention,
                          attention_type="default") -> nn.ModuleList:
    """One spatial transformer after each resnet; ``layers`` is their depth, one int or one per resnet (a longer
    list is cut: the middle block takes one transformer from the last stage's list)."""
    if isinstance(layers, int):
        layers = [layers] * num_resnets
    if len(layers) < num_resnets:
        raise ValueError(f"transformer depths {list(layers)} name fewer than the {num_resnets} layers of the block")
    layers = layers[:num_resnets]
    return nn.ModuleList(
        SpatialTransformer(heads, channels // heads, in_channels=channels, num_layers=depth,
                           norm_num_groups=groups, cross_attention_dim=cross_attention_dim,
                           use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
                           upcast_attention=upcast_attention, attention_type=attention_type)
        for depth in layers)


class CrossAttnDownBlock2D(DownBlock2D):
    """``DownBlock2D`` with a spatial transformer after each resnet."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float = 0.0,
                 num_layers: int = 1, transformer_layers_per_block=1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 downsample_padding: int = 1, add_downsample: bool = True, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False, attention_type: str = "default"):
        super().__init__(in_channels, out_channels, temb_channels, dropout=dropout, num_layers=num_layers,
                         resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_downsample=add_downsample,
                         downsample_padding=downsample_padding)
        self.attentions = _spatial_transformers(out_channels, num_attention_heads, transformer_layers_per_block,
                                                num_layers, resnet_groups, cross_attention_dim,
                                                use_linear_projection, only_cross_attention, upcast_attention,
                                                attention_type)

    def forward(self, hidden_states, temb=None, **context):
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), **context)
            skips += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips += (hidden_states,)
        return hidden_states, skips


class CrossAttnUpBlock2D(UpBlock2D):
    """``UpBlock2D`` with a spatial transformer after each resnet."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 dropout: float = 0.0, num_layers: int = 1, transformer_layers_per_block=1, resnet_eps: float = 1e-6,
                 resnet_time_scale_shift: str = "default", resnet_act_fn: str = "swish", resnet_groups: int = 32,
                 num_attention_heads: int = 1, cross_attention_dim: int = 1280, output_scale_factor: float = 1.0,
                 add_upsample: bool = True, use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False, attention_type: str = "default"):
        super().__init__(in_channels, prev_output_channel, out_channels, temb_channels, dropout=dropout,
                         num_layers=num_layers, resnet_eps=resnet_eps, resnet_time_scale_shift=resnet_time_scale_shift,
                         resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
                         output_scale_factor=output_scale_factor, add_upsample=add_upsample)
        self.attentions = _spatial_transformers(out_channels, num_attention_heads, transformer_layers_per_block,
                                                num_layers, resnet_groups, cross_attention_dim,
                                                use_linear_projection, only_cross_attention, upcast_attention,
                                                attention_type)

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, **context):
        for resnet, attn in zip(self.resnets, self.attentions):
            *res_hidden_states_tuple, skip = res_hidden_states_tuple
            hidden_states = attn(resnet(torch.cat([hidden_states, skip], dim=1), temb), **context)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UNetMidBlock2DCrossAttn(UNetMidBlock2D):
    """resnet, then ``num_layers`` x (spatial transformer, resnet)."""

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, dropout: float = 0.0, num_layers: int = 1,
                 transformer_layers_per_block=1, resnet_eps: float = 1e-6, resnet_time_scale_shift: str = "default",
                 resnet_act_fn: str = "swish", resnet_groups: int | None = 32, num_attention_heads: int = 1,
                 output_scale_factor: float = 1.0, cross_attention_dim: int = 1280,
                 use_linear_projection: bool = False, upcast_attention: bool = False, attention_type: str = "default"):
        super().__init__(in_channels, temb_channels, dropout=dropout, num_layers=num_layers, resnet_eps=resnet_eps,
                         resnet_time_scale_shift=resnet_time_scale_shift, resnet_act_fn=resnet_act_fn,
                         resnet_groups=resnet_groups, add_attention=False, output_scale_factor=output_scale_factor)
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        self.attentions = _spatial_transformers(in_channels, num_attention_heads, transformer_layers_per_block,
                                                num_layers, groups, cross_attention_dim, use_linear_projection,
                                                False, upcast_attention, attention_type)

    def forward(self, hidden_states, temb=None, **context):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = resnet(attn(hidden_states, **context), temb)
        return hidden_states


# -- building the down / mid / up paths from config values ------------------------------------------------------

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D",
               "SimpleCrossAttnDownBlock2D", "KDownBlock2D", "KCrossAttnDownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D",
             "KUpBlock2D", "KCrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None)
# NCSN++ stages thread an image-resolution side path through the network, which only UNet2DModel carries.
SIDE_PATH_BLOCKS = ("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D")


def per_block(value, n: int, key: str) -> list:
    """A config value given once for all stages, or once per stage (checked)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key} has {len(value)} entries but there are {n} down blocks; give one per block "
                             f"or a single value")
        return list(value)
    return [value] * n


def check_block_types(down_block_types, up_block_types, mid_block_type, model="UNet2DConditionModel"):
    """Block type names, as in diffusers (which also accepts a legacy "UNetRes" prefix)."""
    for kind, types, known in (("down_block_types", down_block_types, DOWN_BLOCKS),
                               ("up_block_types", up_block_types, UP_BLOCKS)):
        for t in types:
            if t.removeprefix("UNetRes") in SIDE_PATH_BLOCKS:
                raise ValueError(f"{kind} contains {t!r}, an NCSN++ stage whose image-resolution side path only "
                                 f"UNet2DModel runs (diffusers builds it in {model} but cannot run it); use "
                                 f"UNet2DModel or another block type")
            if t.removeprefix("UNetRes") not in known:
                raise ValueError(f"{kind} contains {t!r}; {model} builds {', '.join(known)}")
    if mid_block_type not in MID_BLOCKS:
        raise ValueError(f"mid_block_type={mid_block_type!r}; {model} builds "
                         f"{', '.join(str(t) for t in MID_BLOCKS)}")


def build_down_block(block_type, in_channels, out_channels, temb_channels, num_layers, add_downsample, *,
                     transformer_layers, num_attention_heads, head_dim, cross_attention_dim, only_cross_attention,
                     norm_eps, act_fn, norm_num_groups, downsample_padding, dropout, use_linear_projection,
                     upcast_attention, resnet_time_scale_shift, resnet_skip_time_act=False,
                     resnet_out_scale_factor=1.0, cross_attention_norm=None, attention_type="default") -> nn.Module:
    """One down stage. Spatial transformers take ``num_attention_heads``; the other attention stages take
    ``head_dim``, the width of a head."""
    resnets = dict(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, dropout=dropout,
                   num_layers=num_layers, resnet_eps=norm_eps, resnet_act_fn=act_fn)
    plain = dict(resnets, resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift)
    biggan = dict(plain, output_scale_factor=resnet_out_scale_factor, skip_time_act=resnet_skip_time_act)
    block_type = block_type.removeprefix("UNetRes")
    if block_type == "DownBlock2D":
        return DownBlock2D(**plain, add_downsample=add_downsample, downsample_padding=downsample_padding)
    if block_type == "CrossAttnDownBlock2D":
        return CrossAttnDownBlock2D(
            **plain, add_downsample=add_downsample, downsample_padding=downsample_padding,
            transformer_layers_per_block=transformer_layers, num_attention_heads=num_attention_heads,
            cross_attention_dim=cross_attention_dim, use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
            attention_type=attention_type)
    if block_type == "AttnDownBlock2D":
        return AttnDownBlock2D(**plain, attention_head_dim=head_dim, downsample_padding=downsample_padding,
                               downsample_type="conv" if add_downsample else None)
    if block_type == "ResnetDownsampleBlock2D":
        return ResnetDownsampleBlock2D(**biggan, add_downsample=add_downsample)
    if block_type == "SimpleCrossAttnDownBlock2D":
        return SimpleCrossAttnDownBlock2D(**biggan, add_downsample=add_downsample, attention_head_dim=head_dim,
                                          cross_attention_dim=cross_attention_dim,
                                          only_cross_attention=only_cross_attention,
                                          cross_attention_norm=cross_attention_norm)
    if block_type == "KDownBlock2D":
        return KDownBlock2D(**resnets, add_downsample=add_downsample)
    if block_type == "KCrossAttnDownBlock2D":
        return KCrossAttnDownBlock2D(**resnets, add_downsample=add_downsample, attention_head_dim=head_dim,
                                     cross_attention_dim=cross_attention_dim, add_self_attention=not add_downsample)
    raise ValueError(f"down block type {block_type!r} is not one of {', '.join(DOWN_BLOCKS)}")


def build_up_block(block_type, in_channels, prev_output_channel, out_channels, temb_channels, num_layers,
                   add_upsample, *, transformer_layers, num_attention_heads, head_dim, cross_attention_dim,
                   only_cross_attention, norm_eps, act_fn, norm_num_groups, dropout, use_linear_projection,
                   upcast_attention, resnet_time_scale_shift, resnet_skip_time_act=False,
                   resnet_out_scale_factor=1.0, cross_attention_norm=None, attention_type="default") -> nn.Module:
    """One up stage (see ``build_down_block``)."""
    resnets = dict(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, dropout=dropout,
                   num_layers=num_layers, resnet_eps=norm_eps, resnet_act_fn=act_fn)
    plain = dict(resnets, prev_output_channel=prev_output_channel, resnet_groups=norm_num_groups,
                 resnet_time_scale_shift=resnet_time_scale_shift)
    biggan = dict(plain, output_scale_factor=resnet_out_scale_factor, skip_time_act=resnet_skip_time_act)
    block_type = block_type.removeprefix("UNetRes")
    if block_type == "UpBlock2D":
        return UpBlock2D(**plain, add_upsample=add_upsample)
    if block_type == "CrossAttnUpBlock2D":
        return CrossAttnUpBlock2D(
            **plain, add_upsample=add_upsample, transformer_layers_per_block=transformer_layers,
            num_attention_heads=num_attention_heads, cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention, attention_type=attention_type)
    if block_type == "AttnUpBlock2D":
        return AttnUpBlock2D(**plain, attention_head_dim=head_dim, upsample_type="conv" if add_upsample else None)
    if block_type == "ResnetUpsampleBlock2D":
        return ResnetUpsampleBlock2D(**biggan, add_upsample=add_upsample)
    if block_type == "SimpleCrossAttnUpBlock2D":
        return SimpleCrossAttnUpBlock2D(**biggan, add_upsample=add_upsample, attention_head_dim=head_dim,
                                        cross_attention_dim=cross_attention_dim,
                                        only_cross_attention=only_cross_attention,
                                        cross_attention_norm=cross_attention_norm)
    if block_type == "KUpBlock2D":
        return KUpBlock2D(**resnets, add_upsample=add_upsample)
    if block_type == "KCrossAttnUpBlock2D":
        return KCrossAttnUpBlock2D(**resnets, add_upsample=add_upsample, attention_head_dim=head_dim,
                                   cross_attention_dim=cross_attention_dim)
    raise ValueError(f"up block type {block_type!r} is not one of {', '.join(UP_BLOCKS)}")


def build_down_blocks(down_block_types, block_out_channels, temb_channels, *, layers_per_block, transformer_layers,
                      num_attention_heads, attention_head_dim, cross_attention_dim, only_cross_attention,
                      **options) -> nn.ModuleList:
    """The down path; the per-stage arguments are lists (see ``per_block``). A stage without an
    ``attention_head_dim`` uses one head as wide as its channels."""
    n = len(down_block_types)
    return nn.ModuleList(
        build_down_block(block_type, block_out_channels[max(i - 1, 0)], block_out_channels[i], temb_channels,
                         layers_per_block[i], i < n - 1, transformer_layers=transformer_layers[i],
                         num_attention_heads=num_attention_heads[i],
                         head_dim=attention_head_dim[i] or block_out_channels[i],
                         cross_attention_dim=cross_attention_dim[i], only_cross_attention=only_cross_attention[i],
                         **options)
        for i, block_type in enumerate(down_block_types))


def build_mid_block(mid_block_type, channels, temb_channels, *, transformer_layers, num_attention_heads,
                    attention_head_dim, cross_attention_dim, only_cross_attention, norm_eps, act_fn, norm_num_groups,
                    mid_block_scale_factor, dropout, use_linear_projection, upcast_attention,
                    resnet_time_scale_shift, resnet_skip_time_act=False, cross_attention_norm=None,
                    attention_type="default"):
    """The middle stage; its resnets divide their output by ``mid_block_scale_factor``."""
    common = dict(in_channels=channels, temb_channels=temb_channels, dropout=dropout, resnet_eps=norm_eps,
                  resnet_act_fn=act_fn, resnet_groups=norm_num_groups, resnet_time_scale_shift=resnet_time_scale_shift,
                  output_scale_factor=mid_block_scale_factor)
    if mid_block_type == "UNetMidBlock2DCrossAttn":
        return UNetMidBlock2DCrossAttn(**common, transformer_layers_per_block=transformer_layers,
                                       num_attention_heads=num_attention_heads,
                                       cross_attention_dim=cross_attention_dim,
                                       use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                                       attention_type=attention_type)
    if mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
        return UNetMidBlock2DSimpleCrossAttn(**common, attention_head_dim=attention_head_dim,
                                             cross_attention_dim=cross_attention_dim,
                                             skip_time_act=resnet_skip_time_act,
                                             only_cross_attention=only_cross_attention,
                                             cross_attention_norm=cross_attention_norm)
    if mid_block_type == "UNetMidBlock2D":  # two resnets, no attention
        return UNetMidBlock2D(**common, num_layers=0, add_attention=False)
    return None


def build_up_blocks(up_block_types, block_out_channels, temb_channels, *, layers_per_block, up_transformer_layers,
                    num_attention_heads, attention_head_dim, cross_attention_dim, only_cross_attention,
                    **options) -> nn.ModuleList:
    """The up path, mirroring the down path: per-stage lists are in down-path order, except
    ``up_transformer_layers`` (up-path order) and ``attention_head_dim``, which diffusers reads at the up
    stage's own position (the same thing for the symmetric lists of published models). Each stage has one resnet
    more than its mirror, to take the skip of the mirror's downsampler (or of ``conv_in``)."""
    n = len(up_block_types)
    channels = list(block_out_channels)[::-1]
    blocks = []
    for i, block_type in enumerate(up_block_types):
        j = n - 1 - i  # the down stage this up stage mirrors
        blocks.append(build_up_block(
            block_type, channels[min(i + 1, n - 1)], channels[max(i - 1, 0)], channels[i], temb_channels,
            layers_per_block[j] + 1, i < n - 1, transformer_layers=up_transformer_layers[i],
            num_attention_heads=num_attention_heads[j], head_dim=attention_head_dim[i] or channels[i],
            cross_attention_dim=cross_attention_dim[j], only_cross_attention=only_cross_attention[j], **options))
    return nn.ModuleList(blocks)


# -- the conditioning vector -----------------------------------------------------------------------------------


class ConditioningEmbeddings:
    """Timestep, class and added (SDXL, IF, Kandinsky) embeddings, and the context projection: the parts a
    ControlNet shares with its UNet. Mixed into an ``nn.Module``; module names are diffusers'."""

    def _init_embeddings(self, *, block_out_channels, flip_sin_to_cos, freq_shift, act_fn, cross_attention_dim,
                         time_embedding_type="positional", time_embedding_dim=None, timestep_post_act=None,
                         time_cond_proj_dim=None, time_embedding_act_fn=None, class_embed_type=None,
                         num_class_embeds=None, projection_class_embeddings_input_dim=None,
                         class_timestep_act_fn=None, addition_embed_type=None, addition_time_embed_dim=None,
                         addition_embed_type_num_heads=64, encoder_hid_dim=None, encoder_hid_dim_type=None) -> int:
        """Build the embedding modules; returns the width of ``emb``. ``class_timestep_act_fn`` is the activation
        of the ``class_embed_type="timestep"`` MLP (``act_fn`` when None)."""
        if time_embedding_type == "positional":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = block_out_channels[0]
        elif time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 2
            if time_embed_dim % 2:
                raise ValueError(f"time_embedding_dim={time_embed_dim} must be even for fourier embeddings")
            self.time_proj = GaussianFourierProjection(time_embed_dim // 2, log=False, flip_sin_to_cos=flip_sin_to_cos)
            timestep_input_dim = time_embed_dim
        else:
            raise ValueError(f"time_embedding_type={time_embedding_type!r} is not 'positional' or 'fourier'")
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn,
                                                post_act_fn=timestep_post_act, cond_proj_dim=time_cond_proj_dim)

        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if encoder_hid_dim_type is not None and encoder_hid_dim is None:
            raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r} needs encoder_hid_dim (the width of "
                             f"the encoder states to project)")
        if encoder_hid_dim_type == "text_proj":
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim)
        elif encoder_hid_dim_type == "text_image_proj":  # Kandinsky 2.1
            self.encoder_hid_proj = TextImageProjection(text_embed_dim=encoder_hid_dim,
                                                        image_embed_dim=cross_attention_dim,
                                                        cross_attention_dim=cross_attention_dim)
        elif encoder_hid_dim_type == "image_proj":  # Kandinsky 2.2
            self.encoder_hid_proj = ImageProjection(image_embed_dim=encoder_hid_dim,
                                                    cross_attention_dim=cross_attention_dim)
        elif encoder_hid_dim_type is None:
            self.encoder_hid_proj = None
        else:
            raise ValueError(f"encoder_hid_dim_type={encoder_hid_dim_type!r} is not None, 'text_proj', "
                             f"'text_image_proj' or 'image_proj' (an IP-Adapter loader sets 'ip_image_proj' itself)")
        # Set by an IP-Adapter loader when it takes over ``encoder_hid_proj`` from a "text_proj" model.
        self.text_encoder_hid_proj = None

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim,
                                                     act_fn=class_timestep_act_fn or act_fn)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type in ("projection", "simple_projection"):
            if projection_class_embeddings_input_dim is None:
                raise ValueError(f"class_embed_type={class_embed_type!r} needs projection_class_embeddings_input_dim")
            self.class_embedding = (TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
                                    if class_embed_type == "projection"
                                    else nn.Linear(projection_class_embeddings_input_dim, time_embed_dim))
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"class_embed_type={class_embed_type!r} is not None, 'timestep', 'identity', "
                             f"'projection' or 'simple_projection'")

        self.add_time_proj = None
        if addition_embed_type == "text":  # DeepFloyd IF: attention-pooled text states
            self.add_embedding = TextTimeEmbedding(encoder_hid_dim or cross_attention_dim, time_embed_dim,
                                                   num_heads=addition_embed_type_num_heads)
        elif addition_embed_type == "text_image":  # Kandinsky 2.1
            self.add_embedding = TextImageTimeEmbedding(text_embed_dim=cross_attention_dim,
                                                        image_embed_dim=cross_attention_dim,
                                                        time_embed_dim=time_embed_dim)
        elif addition_embed_type == "text_time":  # SDXL: pooled text embedding + sinusoidal size/crop ids
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type == "image":  # Kandinsky 2.2
            self.add_embedding = ImageTimeEmbedding(image_embed_dim=encoder_hid_dim, time_embed_dim=time_embed_dim)
        elif addition_embed_type == "image_hint":  # Kandinsky 2.2 ControlNet
            self.add_embedding = ImageHintTimeEmbedding(image_embed_dim=encoder_hid_dim,
                                                        time_embed_dim=time_embed_dim)
        elif addition_embed_type is None:
            self.add_embedding = None
        else:
            raise ValueError(f"addition_embed_type={addition_embed_type!r} is not None, 'text', 'text_image', "
                             f"'text_time', 'image' or 'image_hint'")
        self.time_embed_act = activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None
        return time_embed_dim

    def _time_embed(self, sample, timestep, timestep_cond=None):
        """The timestep (a number, a 0-d tensor or one per batch item) through its projection and MLP."""
        if not torch.is_tensor(timestep):
            # As in diffusers: a Python float becomes float64 (where the device has it), which the Fourier
            # projection keeps until its sines; an int becomes int64.
            float_dtype = torch.float32 if sample.device.type in ("mps", "npu") else torch.float64
            timestep = torch.tensor([timestep], dtype=float_dtype if isinstance(timestep, float) else torch.int64,
                                    device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep.expand(sample.shape[0])
        return self.time_embedding(self.time_proj(timestep).to(sample.dtype), timestep_cond)

    def _class_embed(self, sample, class_labels):
        """The class embedding, or None for a model without one."""
        if self.class_embedding is None:
            return None
        if class_labels is None:
            raise ValueError(f"this model has a class embedding (class_embed_type={self.config.class_embed_type!r}, "
                             f"num_class_embeds={self.config.num_class_embeds!r}); pass class_labels")
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(sample.dtype)
        return self.class_embedding(class_labels).to(sample.dtype)

    def _added_embed(self, emb, encoder_hidden_states, added_cond_kwargs):
        """``(aug_emb, hint)``: the ``addition_embed_type`` embedding added to ``emb`` (None without one) and,
        for "image_hint", the encoded hint that becomes extra input channels (else None)."""
        kind = self.config.addition_embed_type
        if kind is None:
            return None, None
        if kind == "text":
            return self.add_embedding(encoder_hidden_states), None
        needs = {"text_image": ("image_embeds",), "text_time": ("text_embeds", "time_ids"),
                 "image": ("image_embeds",), "image_hint": ("image_embeds", "hint")}[kind]
        added = added_cond_kwargs or {}
        for key in needs:
            if key not in added:
                raise ValueError(f"this model has addition_embed_type={kind!r} and needs added_cond_kwargs['{key}']")
        if kind == "text_image":  # without text_embeds, the text states themselves
            return self.add_embedding(added.get("text_embeds", encoder_hidden_states), added["image_embeds"]), None
        if kind == "text_time":
            text_embeds = added["text_embeds"]
            time_embeds = self.add_time_proj(added["time_ids"].flatten()).reshape(text_embeds.shape[0], -1)
            return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype)), None
        if kind == "image":
            return self.add_embedding(added["image_embeds"]), None
        return self.add_embedding(added["image_embeds"], added["hint"])

    def _project_context(self, encoder_hidden_states, added_cond_kwargs=None):
        """The cross-attention context: the text states, projected if the model has ``encoder_hid_proj``
        (Kandinsky builds it from image embeddings); with an IP-Adapter image projection
        ``(text_states, image_states)`` for the IP-Adapter attention processors."""
        kind = self.config.encoder_hid_dim_type
        if self.encoder_hid_proj is None:
            return encoder_hidden_states
        if kind == "text_proj":
            return self.encoder_hid_proj(encoder_hidden_states)
        if not added_cond_kwargs or "image_embeds" not in added_cond_kwargs:
            what = "an IP-Adapter is loaded" if kind == "ip_image_proj" else "this model has"
            raise ValueError(f"{what} (encoder_hid_dim_type={kind!r}); pass added_cond_kwargs['image_embeds']")
        image_embeds = added_cond_kwargs["image_embeds"]
        if kind == "text_image_proj":
            return self.encoder_hid_proj(encoder_hidden_states, image_embeds)
        if kind == "image_proj":
            return self.encoder_hid_proj(image_embeds)
        if kind == "ip_image_proj":
            if self.text_encoder_hid_proj is not None:
                encoder_hidden_states = self.text_encoder_hid_proj(encoder_hidden_states)
            return encoder_hidden_states, self.encoder_hid_proj(image_embeds)
        raise ValueError(f"encoder_hid_dim_type={kind!r} is not 'text_proj', 'text_image_proj', 'image_proj' or "
                         f"'ip_image_proj'")


# -- the model -------------------------------------------------------------------------------------------------


class UNet2DConditionModel(ModelMixin, AttentionProcessorMixin, ConditioningEmbeddings):
    """Conditional UNet; call ``unet(sample, timestep, encoder_hidden_states, ...)``.

    Besides the spatial-transformer stages of Stable Diffusion it builds the plain ``AttnDownBlock2D`` /
    ``ResnetDownsampleBlock2D`` stages, the "simple cross-attention" stages of unCLIP, DeepFloyd IF and Kandinsky
    (``resnet_skip_time_act``, ``resnet_out_scale_factor``, ``cross_attention_norm`` and
    ``mid_block_only_cross_attention`` configure those) and the k-diffusion stages of the SD x2 latent upscaler.
    ``attention_head_dim`` means a number of heads for spatial transformers and a head width elsewhere, as in
    diffusers.
    """

    @register_to_config
    def __init__(self, sample_size=None, in_channels: int = 4, out_channels: int = 4,
                 center_input_sample: bool = False, flip_sin_to_cos: bool = True, freq_shift: int = 0,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 downsample_padding: int = 1, mid_block_scale_factor: float = 1, dropout: float = 0.0,
                 act_fn: str = "silu", norm_num_groups: int | None = 32, norm_eps: float = 1e-5,
                 cross_attention_dim=1280, transformer_layers_per_block=1, reverse_transformer_layers_per_block=None,
                 encoder_hid_dim: int | None = None, encoder_hid_dim_type: str | None = None,
                 attention_head_dim=8, num_attention_heads=None, dual_cross_attention: bool = False,
                 use_linear_projection: bool = False, class_embed_type: str | None = None,
                 addition_embed_type: str | None = None, addition_time_embed_dim: int | None = None,
                 num_class_embeds: int | None = None, upcast_attention: bool = False,
                 resnet_time_scale_shift: str = "default", resnet_skip_time_act: bool = False,
                 resnet_out_scale_factor: float = 1.0, time_embedding_type: str = "positional",
                 time_embedding_dim: int | None = None, time_embedding_act_fn: str | None = None,
                 timestep_post_act: str | None = None, time_cond_proj_dim: int | None = None,
                 conv_in_kernel: int = 3, conv_out_kernel: int = 3,
                 projection_class_embeddings_input_dim: int | None = None, attention_type: str = "default",
                 class_embeddings_concat: bool = False, mid_block_only_cross_attention: bool | None = None,
                 cross_attention_norm: str | None = None, addition_embed_type_num_heads: int = 64):
        super().__init__()
        n = len(down_block_types)
        if num_attention_heads is not None:
            raise ValueError("num_attention_heads must stay None: in UNet2DConditionModel configs the number of "
                             "heads is given by attention_head_dim")
        if dual_cross_attention:
            raise ValueError("dual_cross_attention=True (Versatile Diffusion's two-context transformers) is not "
                             "supported, and diffusers cannot run it either; set it to False")
        if len(up_block_types) != n or len(block_out_channels) != n:
            raise ValueError(f"down_block_types, up_block_types and block_out_channels must have the same length "
                             f"(got {n}, {len(up_block_types)}, {len(block_out_channels)})")
        check_block_types(down_block_types, up_block_types, mid_block_type)
        head_config = per_block(attention_head_dim, n, "attention_head_dim")
        layers = per_block(layers_per_block, n, "layers_per_block")
        context_dims = per_block(cross_attention_dim, n, "cross_attention_dim")
        depths = per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        only_cross = per_block(only_cross_attention, n, "only_cross_attention")
        if mid_block_only_cross_attention is None:  # follows a single only_cross_attention flag
            mid_block_only_cross_attention = only_cross_attention if isinstance(only_cross_attention, bool) else False
        if reverse_transformer_layers_per_block is not None:
            up_depths = per_block(reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block")
        elif any(isinstance(d, (list, tuple)) for d in depths):
            raise ValueError("transformer_layers_per_block gives per-layer depths; the up path then needs "
                             "reverse_transformer_layers_per_block")
        else:
            up_depths = depths[::-1]

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=(conv_in_kernel - 1) // 2)
        time_embed_dim = self._init_embeddings(
            block_out_channels=block_out_channels, flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift,
            act_fn=act_fn, cross_attention_dim=cross_attention_dim, time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim, timestep_post_act=timestep_post_act,
            time_cond_proj_dim=time_cond_proj_dim, time_embedding_act_fn=time_embedding_act_fn,
            class_embed_type=class_embed_type, num_class_embeds=num_class_embeds,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            addition_embed_type=addition_embed_type, addition_time_embed_dim=addition_time_embed_dim,
            addition_embed_type_num_heads=addition_embed_type_num_heads, encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type)
        temb_channels = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        shared = dict(norm_eps=norm_eps, act_fn=act_fn, norm_num_groups=norm_num_groups, dropout=dropout,
                      use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
                      resnet_time_scale_shift=resnet_time_scale_shift, resnet_skip_time_act=resnet_skip_time_act,
                      cross_attention_norm=cross_attention_norm, attention_type=attention_type)
        # The same per-stage list: heads of spatial transformers, head widths of the other attention stages.
        attention = dict(num_attention_heads=head_config, attention_head_dim=head_config,
                         cross_attention_dim=context_dims, only_cross_attention=only_cross)
        self.down_blocks = build_down_blocks(down_block_types, block_out_channels, temb_channels,
                                             layers_per_block=layers, transformer_layers=depths, **attention,
                                             downsample_padding=downsample_padding,
                                             resnet_out_scale_factor=resnet_out_scale_factor, **shared)
        # Registered before the middle block, as diffusers does: module, state-dict and attn_processors order
        # then match (IP-Adapter files number attention layers in that order).
        self.up_blocks = nn.ModuleList()
        self.mid_block = build_mid_block(mid_block_type, block_out_channels[-1], temb_channels,
                                         transformer_layers=depths[-1], num_attention_heads=head_config[-1],
                                         attention_head_dim=head_config[-1], cross_attention_dim=context_dims[-1],
                                         only_cross_attention=mid_block_only_cross_attention,
                                         mid_block_scale_factor=mid_block_scale_factor, **shared)

        self.up_blocks.extend(build_up_blocks(up_block_types, block_out_channels, temb_channels,
                                              layers_per_block=layers, up_transformer_layers=up_depths, **attention,
                                              resnet_out_scale_factor=resnet_out_scale_factor, **shared))
        self.num_upsamplers = n - 1

        if norm_num_groups is not None:
            self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
            self.conv_act = activation(act_fn)
        else:
            self.conv_norm_out = self.conv_act = None
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, conv_out_kernel,
                                  padding=(conv_out_kernel - 1) // 2)
        # GLIGEN: boxes and their phrases (and images) -> grounding tokens for the transformers' fusers.
        self.position_net = None
        if attention_type in ("gated", "gated-text-image"):
            self.position_net = GLIGENTextBoundingboxProjection(
                positive_len=context_dims[0], out_dim=context_dims[0],
                feature_type="text-only" if attention_type == "gated" else "text-image")

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                class_labels: torch.Tensor | None = None, timestep_cond: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cross_attention_kwargs: dict | None = None,
                added_cond_kwargs: dict | None = None, down_block_additional_residuals=None,
                mid_block_additional_residual: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True):
        """Predict the noise (or v / x0, as trained) for ``sample`` at ``timestep``.

        ``attention_mask`` / ``encoder_attention_mask``: (batch, tokens) keep-masks (1 keep, 0 drop) for the
        self- and cross-attention keys. ``down_block_additional_residuals`` / ``mid_block_additional_residual``
        are a ControlNet's outputs, added to the skips and to the middle. ``cross_attention_kwargs`` reach every
        attention processor.
        """
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("ControlNet residuals come in pairs: pass both down_block_additional_residuals and "
                             "mid_block_additional_residual (T2I-Adapter style down-only residuals are not "
                             "supported)")
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self._time_embed(sample, timestep, timestep_cond)
        class_emb = self._class_embed(sample, class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        aug_emb, hint = self._added_embed(emb, encoder_hidden_states, added_cond_kwargs)
        if hint is not None:  # Kandinsky 2.2 ControlNet: the encoded hint joins the input channels
            sample = torch.cat([sample, hint], dim=1)
        if aug_emb is not None:
            emb = emb + aug_emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen") is not None:
            if self.position_net is None:
                raise ValueError("cross_attention_kwargs['gligen'] was given but this UNet has no GLIGEN layers "
                                 "(attention_type='default')")
            grounding = self.position_net(**cross_attention_kwargs["gligen"])
            cross_attention_kwargs = {**cross_attention_kwargs, "gligen": {"objs": grounding}}
        context = dict(encoder_hidden_states=self._project_context(encoder_hidden_states, added_cond_kwargs),
                       attention_mask=mask_to_bias(attention_mask, sample.dtype),
                       encoder_attention_mask=mask_to_bias(encoder_attention_mask, sample.dtype),
                       cross_attention_kwargs=cross_attention_kwargs)

        def run(block, *args, **kwargs):
            return block(*args, **kwargs, **context) if getattr(block, "has_cross_attention", False) \
                else block(*args, **kwargs)

        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            sample, block_skips = run(block, sample, emb)
            skips += block_skips

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors but this UNet keeps {len(skips)} skips; the ControlNet must mirror the "
                                 f"UNet's down path")
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        if self.mid_block is not None:
            sample = run(self.mid_block, sample, emb)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the size of the next skip: input sizes need not be multiples of 2**num_upsamplers.
            upsample_size = skips[-1].shape[2:] if skips and skips[-1] is not None else None
            sample = run(block, sample, block_skips, emb, upsample_size=upsample_size)
            if upsample_size is not None and sample.shape[2:] != upsample_size:
                raise ValueError(f"{type(block).__name__} doubles sizes and cannot follow the odd-sized skips of "
                                 f"this sample; give a sample whose height and width are multiples of "
                                 f"{2 ** self.num_upsamplers}")

        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)
