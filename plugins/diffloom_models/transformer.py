"""The spatial transformer of latent-diffusion UNets: feature maps as tokens, self-attention, cross-attention
to the text (or other context), a gated feed-forward; each sub-layer pre-normed and residual.

State-dict names follow diffusers' ``Transformer2DModel`` / ``BasicTransformerBlock`` / ``FeedForward``:
``norm``, ``proj_in``, ``transformer_blocks.N.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}`` (and
``fuser`` for GLIGEN), ``proj_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, dropout_layer


class GELU(nn.Module):
    """Linear then GELU (``approximate="tanh"`` for the tanh form)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to twice the width, half of it gates the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """Linear then the sigmoid approximation of GELU, x * sigmoid(1.702 x)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.proj(x)
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "gelu": lambda i, o: GELU(i, o),
    "gelu-approximate": lambda i, o: GELU(i, o, approximate="tanh"),
    "geglu": GEGLU,
    "geglu-approximate": ApproximateGELU,
}


class FeedForward(nn.Module):
    """``net.0`` (projection + activation), ``net.1`` (dropout), ``net.2`` (projection back)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0,
                 activation_fn: str = "geglu"):
        super().__init__()
        if activation_fn not in _ACTIVATIONS:
            raise ValueError(f"activation_fn={activation_fn!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        inner_dim = int(dim * mult)
        self.net = nn.ModuleList([_ACTIVATIONS[activation_fn](dim, inner_dim), dropout_layer(dropout),
                                  nn.Linear(inner_dim, dim_out if dim_out is not None else dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class GatedSelfAttentionDense(nn.Module):
    """GLIGEN's grounding layer (Li et al. 2023): the visual tokens attend over themselves and the grounding
    tokens (``linear(objs)``), then pass a feed-forward; both residual branches are gated by ``tanh`` of a learned
    scalar, which starts at zero so that an untrained layer changes nothing."""

    def __init__(self, query_dim: int, context_dim: int, n_heads: int, d_head: int):
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = Attention(query_dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(query_dim, activation_fn="geglu")
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        n_visual = x.shape[1]
        attended = self.attn(self.norm1(torch.cat([x, self.linear(objs)], dim=1)))[:, :n_visual]
        x = x + self.alpha_attn.tanh() * attended
        return x + self.alpha_dense.tanh() * self.ff(self.norm2(x))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward, each as ``x + f(LayerNorm(x))``.

    ``only_cross_attention`` makes the first attention attend to the context too; ``double_self_attention``
    makes the second one self-attention (no context); without a ``cross_attention_dim`` and without
    ``double_self_attention`` there is no second attention at all. ``attention_type="gated"`` or
    ``"gated-text-image"`` (GLIGEN) adds a ``fuser`` after the self-attention, applied when
    ``cross_attention_kwargs["gligen"]`` carries the grounding tokens (``{"objs": ...}``).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
                 cross_attention_dim: int | None = None, activation_fn: str = "geglu",
                 attention_bias: bool = False, only_cross_attention: bool = False,
                 double_self_attention: bool = False, upcast_attention: bool = False,
                 norm_elementwise_affine: bool = True, norm_eps: float = 1e-5, attention_type: str = "default"):
        super().__init__()
        if attention_type not in ("default", "gated", "gated-text-image"):
            raise ValueError(f"attention_type={attention_type!r} is not 'default', 'gated' or 'gated-text-image'")
        self.only_cross_attention = only_cross_attention

        def attention(context_dim):
            return Attention(dim, cross_attention_dim=context_dim, heads=num_attention_heads,
                             dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                             upcast_attention=upcast_attention)

        def norm():
            return nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)

        self.norm1 = norm()
        self.attn1 = attention(cross_attention_dim if only_cross_attention else None)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = norm()
            self.attn2 = attention(None if double_self_attention else cross_attention_dim)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = norm()
        self.ff = FeedForward(dim, dropout=dropout, activation_fn=activation_fn)
        self.fuser = (GatedSelfAttentionDense(dim, cross_attention_dim, num_attention_heads, attention_head_dim)
                      if attention_type != "default" else None)

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cross_attention_kwargs=None):
        kwargs = dict(cross_attention_kwargs or {})
        gligen = kwargs.pop("gligen", None)
        hidden_states = hidden_states + self.attn1(
            self.norm1(hidden_states),
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask, **kwargs)
        if gligen is not None:
            if self.fuser is None:
                raise ValueError("cross_attention_kwargs['gligen'] was given but this model has no GLIGEN layers "
                                 "(attention_type='default')")
            hidden_states = self.fuser(hidden_states, gligen["objs"])
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask, **kwargs)
        return hidden_states + self.ff(self.norm3(hidden_states))


def mask_to_bias(mask, dtype):
    """A keep-mask (B, L) of 1/0 -> the additive bias (B, 1, L) of 0/-10000 that attention adds to scores;
    a tensor that is already a bias (3 dims) passes through."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class SpatialTransformer(nn.Module):
    """Group norm, project to ``heads * head_dim`` channels, ``num_layers`` transformer blocks over the H*W
    tokens, project back, add the input (diffusers' ``Transformer2DModel`` for continuous input).

    ``use_linear_projection`` picks ``nn.Linear`` projections on tokens (SD 2.x, SDXL) instead of 1x1
    convolutions on the feature map (SD 1.x); the two differ only in where the reshape happens.
    """

    def __init__(self, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int = 1,
                 dropout: float = 0.0, norm_num_groups: int = 32, cross_attention_dim: int | None = None,
                 attention_bias: bool = False, activation_fn: str = "geglu", use_linear_projection: bool = False,
                 only_cross_attention: bool = False, double_self_attention: bool = False,
                 upcast_attention: bool = False, norm_elementwise_affine: bool = True, norm_eps: float = 1e-5,
                 attention_type: str = "default"):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  attention_bias=attention_bias, only_cross_attention=only_cross_attention,
                                  double_self_attention=double_self_attention, upcast_attention=upcast_attention,
                                  norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
                                  attention_type=attention_type)
            for _ in range(num_layers)])

    def forward(self, hidden_states, encoder_hidden_states=None, cross_attention_kwargs=None, attention_mask=None,
                encoder_attention_mask=None):
        attention_mask = mask_to_bias(attention_mask, hidden_states.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, hidden_states.dtype)
        batch, _, height, width = hidden_states.shape
        residual = hidden_states

        def to_tokens(x):
            return x.permute(0, 2, 3, 1).reshape(batch, height * width, x.shape[1])

        def to_map(x):
            return x.reshape(batch, height, width, x.shape[-1]).permute(0, 3, 1, 2).contiguous()

        x = self.norm(hidden_states)
        x = to_tokens(self.proj_in(x)) if not self.use_linear_projection else self.proj_in(to_tokens(x))
        for block in self.transformer_blocks:
            x = block(x, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                      encoder_attention_mask=encoder_attention_mask, cross_attention_kwargs=cross_attention_kwargs)
        x = self.proj_out(to_map(x)) if not self.use_linear_projection else to_map(self.proj_out(x))
        return x + residual
