"""Extra conditioning for the UNet's embedding vector and context: the text / image embeddings of DeepFloyd IF,
Kandinsky 2.1 and Kandinsky 2.2 (their ``addition_embed_type`` and ``encoder_hid_dim_type`` config values) and
GLIGEN's box grounding.

- ``TextTimeEmbedding`` (``addition_embed_type="text"``, IF): the text states pooled by attention, into the
  embedding vector;
- ``TextImageTimeEmbedding`` (``"text_image"``, Kandinsky 2.1) and ``ImageTimeEmbedding`` (``"image"``, 2.2): a
  pooled text and/or CLIP image embedding, projected into the embedding vector;
- ``ImageHintTimeEmbedding`` (``"image_hint"``, Kandinsky 2.2 ControlNet): the same, plus a conv stack that turns
  a hint image into 4 extra input channels at latent resolution;
- ``TextImageProjection`` (``encoder_hid_dim_type="text_image_proj"``) and ``ImageProjection`` (``"image_proj"``):
  the cross-attention context built from image (and text) embeddings;
- ``GLIGENTextBoundingboxProjection`` (``attention_type="gated"`` / ``"gated-text-image"``): GLIGEN's grounding
  tokens, one per box.

Module names are diffusers' so checkpoints load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionPooling(nn.Module):
    """Pool a token sequence into one vector, CLIP style: a query token (the mean token plus a learned position)
    attends over itself and the sequence."""

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, width = x.shape
        query_token = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        tokens = torch.cat([query_token, x], dim=1)

        def heads(t):
            return t.view(batch, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        # Each of query and key takes the fourth root of the 1/sqrt(d) scale, which keeps half-precision
        # products in range; the softmax runs in float32.
        scale = (width // self.num_heads) ** -0.25
        query, key = heads(self.q_proj(query_token)) * scale, heads(self.k_proj(tokens)) * scale
        weights = torch.softmax((query @ key.transpose(-1, -2)).float(), dim=-1).to(query.dtype)
        return (weights @ heads(self.v_proj(tokens))).transpose(1, 2).reshape(batch, width)


class TextTimeEmbedding(nn.Module):
    """Text states -> LayerNorm -> attention pooling -> projection -> LayerNorm."""

    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))


class TextImageTimeEmbedding(nn.Module):
    """Projected image embedding plus the LayerNorm of the projected text embedding."""

    def __init__(self, text_embed_dim: int = 768, image_embed_dim: int = 768, time_embed_dim: int = 1536):
        super().__init__()
        self.text_proj = nn.Linear(text_embed_dim, time_embed_dim)
        self.text_norm = nn.LayerNorm(time_embed_dim)
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_proj(image_embeds) + self.text_norm(self.text_proj(text_embeds))


class ImageTimeEmbedding(nn.Module):
    """The LayerNorm of the projected image embedding."""

    def __init__(self, image_embed_dim: int = 768, time_embed_dim: int = 1536):
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)
        self.image_norm = nn.LayerNorm(time_embed_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_norm(self.image_proj(image_embeds))


def _hint_encoder() -> nn.Sequential:
    """3-channel hint image -> 4 channels at 1/8 of its size: 3x3 convs with SiLU between them, three of stride 2."""
    widths = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2), (256, 4, 1)]
    layers = []
    for c_in, c_out, stride in widths:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class ImageHintTimeEmbedding(ImageTimeEmbedding):
    """``ImageTimeEmbedding`` plus ``input_hint_block``, which encodes the hint image; returns both."""

    def __init__(self, image_embed_dim: int = 768, time_embed_dim: int = 1536):
        super().__init__(image_embed_dim, time_embed_dim)
        self.input_hint_block = _hint_encoder()

    def forward(self, image_embeds: torch.Tensor, hint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(image_embeds), self.input_hint_block(hint)


class TextImageProjection(nn.Module):
    """Context = ``num_image_text_embeds`` tokens made from the image embedding, then the projected text states."""

    def __init__(self, text_embed_dim: int = 1024, image_embed_dim: int = 768, cross_attention_dim: int = 768,
                 num_image_text_embeds: int = 10):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.text_proj = nn.Linear(text_embed_dim, cross_attention_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        image_tokens = self.image_embeds(image_embeds).reshape(text_embeds.shape[0], self.num_image_text_embeds, -1)
        return torch.cat([image_tokens, self.text_proj(text_embeds)], dim=1)


class ImageProjection(nn.Module):
    """Context = ``num_image_text_embeds`` LayerNorm'd tokens made from the image embedding."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768, num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


def box_fourier_features(boxes: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(B, N, 4) boxes (x0, y0, x1, y1 in [0, 1]) -> (B, N, num_freqs * 2 * 4): for each frequency (geometric from
    1 to 100), the sines then the cosines of the four coordinates."""
    freqs = 100 ** (torch.arange(num_freqs) / num_freqs)
    angles = freqs.to(boxes.device, boxes.dtype) * boxes[..., None]  # (B, N, 4, F)
    features = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (B, N, 4, F, 2)
    return features.permute(0, 1, 3, 4, 2).flatten(2)


def _grounding_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, out_dim))


class GLIGENTextBoundingboxProjection(nn.Module):
    """GLIGEN's grounding tokens: one per box, an MLP of [phrase (or image) embedding, Fourier features of the
    box]. Padding boxes (mask 0) use learned null features instead. With ``feature_type="text-image"`` the
    phrase tokens are followed by image tokens, each from its own MLP."""

    def __init__(self, positive_len: int, out_dim: int, feature_type: str = "text-only", fourier_freqs: int = 8):
        super().__init__()
        self.fourier_freqs = fourier_freqs
        position_dim = fourier_freqs * 2 * 4
        if feature_type == "text-only":
            self.linears = _grounding_mlp(positive_len + position_dim, out_dim)
            self.null_positive_feature = nn.Parameter(torch.zeros(positive_len))
        elif feature_type == "text-image":
            self.linears_text = _grounding_mlp(positive_len + position_dim, out_dim)
            self.linears_image = _grounding_mlp(positive_len + position_dim, out_dim)
            self.null_text_feature = nn.Parameter(torch.zeros(positive_len))
            self.null_image_feature = nn.Parameter(torch.zeros(positive_len))
        else:
            raise ValueError(f"feature_type={feature_type!r} is not 'text-only' or 'text-image'")
        self.null_position_feature = nn.Parameter(torch.zeros(position_dim))

    def forward(self, boxes, masks, positive_embeddings=None, phrases_masks=None, image_masks=None,
                phrases_embeddings=None, image_embeddings=None) -> torch.Tensor:
        def fill(features, keep, null):  # padding entries take the learned null feature
            keep = keep.unsqueeze(-1)
            return features * keep + (1 - keep) * null

        positions = fill(box_fourier_features(boxes, self.fourier_freqs), masks, self.null_position_feature)
        if positive_embeddings is not None:
            phrases = fill(positive_embeddings, masks, self.null_positive_feature)
            return self.linears(torch.cat([phrases, positions], dim=-1))
        phrases = fill(phrases_embeddings, phrases_masks, self.null_text_feature)
        images = fill(image_embeddings, image_masks, self.null_image_feature)
        return torch.cat([self.linears_text(torch.cat([phrases, positions], dim=-1)),
                          self.linears_image(torch.cat([images, positions], dim=-1))], dim=1)
