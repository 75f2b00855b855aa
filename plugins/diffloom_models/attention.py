"""Multi-head attention and its extension point, the attention processor.

``Attention`` owns the weights (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and, for the VAE / UNet2D kind,
``group_norm``); *how* they are used is delegated to ``attn.processor``. Adapters change attention by
installing a processor, never by patching modules.

The processor protocol
----------------------
A processor is any callable (usually an object with ``__call__``; an ``nn.Module`` when it has weights of its
own, which then appear in the model's state dict under ``<attention path>.processor.``)::

    processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs)
        -> hidden_states

- ``attn`` is the calling ``Attention``: use its projections (``attn.to_q`` ... ``attn.to_out[0]``, then the
  dropout ``attn.to_out[1]``), ``attn.heads``, ``attn.cross_attention_dim`` (the context width ``to_k``
  takes), ``attn.group_norm``, ``attn.residual_connection``, ``attn.rescale_output_factor``, and the helpers
  ``attn.attend(q, k, v, mask)`` (split heads, scaled dot-product attention, merge heads),
  ``attn.spatial_in`` / ``attn.spatial_out`` (feature map <-> group-normed tokens) and ``attn.norm_context``
  (the context norm some layers have, ``cross_attention_norm``).
- ``hidden_states`` is ``(batch, tokens, query_dim)``, or ``(batch, channels, height, width)`` for the
  self-attention of VAE / UNet2D blocks.
- ``encoder_hidden_states`` is ``None`` for self-attention, else ``(batch, context_tokens, cross_dim)``. With an
  IP-Adapter image projection on the UNet (``encoder_hid_dim_type="ip_image_proj"``) it is the tuple
  ``(text_states, image_states)``, ``image_states`` being what ``unet.encoder_hid_proj`` returns for
  ``added_cond_kwargs["image_embeds"]`` (a list, one entry per IP-Adapter, with diffusers' loader layout);
  the default processor refuses it, an IP-Adapter processor unpacks it.
- ``temb`` is never passed by diffloom's models; it stays in the signature so diffusers-style processors fit.
- ``attention_mask`` is an additive bias ``(batch, 1 or query_tokens, key_tokens)`` (0 keeps a token, -10000
  drops it), or ``(batch * heads, ...)`` for a per-head bias.
- ``**kwargs`` are the caller's ``cross_attention_kwargs`` (from ``unet(..., cross_attention_kwargs=...)``).
  ``Attention`` passes a processor only the keys its signature names, or all of them if it takes
  ``**kwargs``; so a key meant for one adapter (LoRA's ``"scale"``, an IP-Adapter's ``"ip_adapter_masks"``) is
  silently dropped for processors that do not ask for it.

Layers built with ``added_kv_proj_dim`` (the "simple cross-attention" of unCLIP, DeepFloyd IF and Kandinsky UNets)
also have ``add_k_proj`` / ``add_v_proj``, which project the context into keys and values that are put in front
of the layer's own self-attention keys and values (or replace them, with ``only_cross_attention``); their default
processor is ``AttnAddedKVProcessor``.

Models that hold attention layers inherit ``AttentionProcessorMixin`` and expose ``attn_processors``
(``{"<module path>.processor": processor}``) and ``set_attn_processor(processor_or_dict)``, the same names
and keys as diffusers.

LoRA does not need a processor: it attaches forward hooks to the plain ``nn.Linear`` / ``nn.Conv2d``
projections, which is why no projection here is wrapped or fused.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn


def _refuse_image_tuple(encoder_hidden_states) -> None:
    if isinstance(encoder_hidden_states, tuple):
        raise ValueError(
            "encoder_hidden_states is a (text, image) tuple, which only an IP-Adapter attention processor "
            "understands; load the IP-Adapter (it installs its processors) or drop added_cond_kwargs"
            "['image_embeds']")


class AttnProcessor:
    """The default processor: one fused ``scaled_dot_product_attention`` call."""

    def __call__(self, attn: "Attention", hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        _refuse_image_tuple(encoder_hidden_states)
        residual = hidden_states
        hidden_states, shape = attn.spatial_in(hidden_states)
        context = hidden_states if encoder_hidden_states is None else attn.norm_context(encoder_hidden_states)
        out = attn.attend(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attention_mask)
        out = attn.to_out[1](attn.to_out[0](out))
        out = attn.spatial_out(out, shape)
        if attn.residual_connection:
            out = out + residual
        # x / 1.0 is x: skipping it saves a kernel launch per layer where eager runs are bound by launches.
        return out / attn.rescale_output_factor if attn.rescale_output_factor != 1 else out


class AttnAddedKVProcessor:
    """Attention over the projected context followed by the layer's own pixels: keys and values are
    ``[add_k_proj(context), to_k(pixels)]`` (only the context part with ``only_cross_attention``), the query is
    ``to_q(pixels)``; the output is added to the input. Used by the "simple cross-attention" UNet stages."""

    def __call__(self, attn: "Attention", hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        _refuse_image_tuple(encoder_hidden_states)
        residual = hidden_states
        tokens = hidden_states.flatten(2).transpose(1, 2)
        # Without a context the layer attends over its own (un-normed) pixels through the added projections.
        context = tokens if encoder_hidden_states is None else attn.norm_context(encoder_hidden_states)
        tokens, _ = attn.spatial_in(tokens)
        key, value = attn.add_k_proj(context), attn.add_v_proj(context)
        if not attn.only_cross_attention:
            key = torch.cat([key, attn.to_k(tokens)], dim=1)
            value = torch.cat([value, attn.to_v(tokens)], dim=1)
            if attention_mask is not None:  # the mask covers the context; every pixel key is kept
                attention_mask = F.pad(attention_mask, (0, tokens.shape[1]), value=0.0)
        out = attn.attend(attn.to_q(tokens), key, value, attention_mask)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.transpose(1, 2).reshape(residual.shape) + residual


def dropout_layer(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or ``nn.Identity`` when ``p`` is 0: the same output either way (and the same state
    dict), without a dispatched no-op per call, which eager runs at batch 1 are bound by."""
    return nn.Dropout(p) if p else nn.Identity()


def _accepted_kwargs(processor) -> frozenset[str] | None:
    """The keyword names a processor takes; None when it takes ``**kwargs``."""
    # A module is called through nn.Module.__call__(*args, **kwargs): its real signature is forward's.
    params = inspect.signature(processor.forward if isinstance(processor, nn.Module) else processor).parameters
    params = params.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params)


class Attention(nn.Module):
    """Multi-head attention; ``cross_attention_dim`` set makes it cross-attention over a context.

    ``norm_num_groups`` adds the group norm of VAE / UNet2D attention (applied to the query input only), and
    ``residual_connection`` / ``rescale_output_factor`` give those blocks' ``(attn(x) + x) / factor``.
    ``upcast_attention`` is kept for the configs that carry it (SD 2.1). As with diffusers' scaled-dot-product
    processor it changes nothing: precision is left to ``scaled_dot_product_attention``, whose fused kernels
    accumulate the softmax in float32.
    """

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, bias: bool = False, upcast_attention: bool = False, out_bias: bool = True,
                 norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, added_kv_proj_dim: int | None = None,
                 only_cross_attention: bool = False, cross_attention_norm: str | None = None,
                 cross_attention_norm_num_groups: int = 32, processor=None):
        super().__init__()
        if only_cross_attention and added_kv_proj_dim is None:
            raise ValueError("only_cross_attention=True drops the self-attention keys, which only a layer with "
                             "added_kv_proj_dim has; set added_kv_proj_dim or leave only_cross_attention False")
        inner_dim = heads * dim_head
        self.heads = heads
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.only_cross_attention = only_cross_attention

        self.group_norm = (nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True)
                           if norm_num_groups is not None else None)
        if cross_attention_norm is None:
            self.norm_cross = None
        elif cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(self.cross_attention_dim)
        elif cross_attention_norm == "group_norm":
            # Normalises the context before any projection, so over the width it arrives with.
            width = added_kv_proj_dim if added_kv_proj_dim is not None else self.cross_attention_dim
            self.norm_cross = nn.GroupNorm(cross_attention_norm_num_groups, width, eps=1e-5, affine=True)
        else:
            raise ValueError(f"cross_attention_norm={cross_attention_norm!r} is not None, 'layer_norm' or "
                             f"'group_norm'")
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        if not only_cross_attention:
            self.to_k = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
            self.to_v = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner_dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias),
                                     dropout_layer(dropout)])
        self.default_processor = AttnAddedKVProcessor if added_kv_proj_dim is not None else AttnProcessor
        self.set_processor(processor if processor is not None else self.default_processor())

    # -- the extension point -----------------------------------------------------------------------------------

    def set_processor(self, processor) -> None:
        if not callable(processor):
            raise TypeError(f"an attention processor must be callable as processor(attn, hidden_states, ...), "
                            f"got {type(processor).__name__}")
        # A processor with weights is a submodule; replacing it by a plain one must drop those weights.
        if isinstance(self._modules.get("processor"), nn.Module) and not isinstance(processor, nn.Module):
            del self._modules["processor"]
        self.processor = processor
        self._processor_kwargs = _accepted_kwargs(processor)

    def get_processor(self):
        return self.processor

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs):
        accepted = self._processor_kwargs
        if accepted is not None:
            cross_attention_kwargs = {k: v for k, v in cross_attention_kwargs.items() if k in accepted}
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **cross_attention_kwargs)

    # -- helpers for processors ----------------------------------------------------------------------------------

    def spatial_in(self, hidden_states):
        """(B, C, H, W) -> (B, H*W, C) tokens, group-normed if this layer has a group norm; returns the shape
        that ``spatial_out`` needs (None for token input)."""
        shape = None
        if hidden_states.ndim == 4:
            shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, shape

    def norm_context(self, encoder_hidden_states):
        """The context through this layer's ``cross_attention_norm`` (if any); a group norm normalises each
        feature over the context tokens."""
        if isinstance(self.norm_cross, nn.GroupNorm):
            return self.norm_cross(encoder_hidden_states.transpose(1, 2)).transpose(1, 2)
        if self.norm_cross is not None:
            return self.norm_cross(encoder_hidden_states)
        return encoder_hidden_states

    @staticmethod
    def spatial_out(hidden_states, shape):
        if shape is None:
            return hidden_states
        return hidden_states.transpose(1, 2).reshape(shape)

    def attend(self, query, key, value, attention_mask=None):
        """Projected (B, Lq, heads*d), (B, Lk, heads*d) x2 -> (B, Lq, heads*d) by scaled dot-product attention."""
        batch, heads = query.shape[0], self.heads

        def split(t):
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        mask = None
        if attention_mask is not None:
            if attention_mask.shape[-1] != key.shape[1]:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} key tokens but the attention "
                                 f"has {key.shape[1]}; pass a mask with one entry per key token")
            if attention_mask.ndim == 4:  # already (B, heads or 1, Lq or 1, Lk)
                mask = attention_mask
            elif attention_mask.shape[0] == batch * heads != batch:
                mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
            else:  # one bias for all heads
                mask = attention_mask.unsqueeze(1)
            if mask.is_floating_point():
                mask = mask.to(query.dtype)
        out = F.scaled_dot_product_attention(split(query), split(key), split(value), attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3])


class AttentionProcessorMixin:
    """``attn_processors`` / ``set_attn_processor`` for an ``nn.Module`` holding ``Attention`` layers."""

    @property
    def attn_processors(self) -> dict:
        return {f"{name}.processor": m.processor for name, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor) -> None:
        """One processor for every attention layer, or a dict keyed like ``attn_processors`` covering all."""
        layers = {f"{name}.processor": m for name, m in self.named_modules() if isinstance(m, Attention)}
        if isinstance(processor, dict):
            missing = [k for k in layers if k not in processor]
            unknown = [k for k in processor if k not in layers]
            if missing or unknown:
                raise ValueError(
                    f"set_attn_processor needs a processor for each of the {len(layers)} attention layers, keyed "
                    f"as in model.attn_processors; missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                    f"unknown {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
            for key, layer in layers.items():
                layer.set_processor(processor[key])
        else:
            for layer in layers.values():
                layer.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Give every attention layer its own kind's default processor."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_processor(module.default_processor())
