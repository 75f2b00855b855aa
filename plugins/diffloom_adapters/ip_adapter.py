"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): an image as a prompt.

A CLIP image encoder turns the reference image into an embedding; an image projection turns that into a few
context tokens (4 from a linear map of the pooled embedding, or, for IP-Adapter Plus, ``num_queries`` tokens
resampled from the encoder's penultimate hidden states by a small perceiver). Each cross-attention layer of the
UNet then attends to those tokens with its own key/value projections ("decoupled cross-attention") and adds
``scale *`` the result to its text attention.

Wiring, through documented extension points only: the projections become the UNet's ``encoder_hid_proj``
(``encoder_hid_dim_type="ip_image_proj"``), so the UNet hands the attention layers ``(text, [image tokens per
adapter])`` for ``added_cond_kwargs["image_embeds"]``; the cross-attention layers get :class:`IPAdapterAttnProcessor`
through ``set_attn_processor``. The pipeline computes ``image_embeds`` by asking this adapter
(:meth:`IPAdapter.image_embeds`) for the call's ``ip_adapter_image`` / ``ip_adapter_image_embeds``. On SDXL the
same ``added_cond_kwargs`` carries the pooled text embedding and the time ids next to them; a ControlNet beside the
UNet reads only those, having no IP-Adapter layers of its own.

Weight file layout (as published and as diffusers reads it): ``image_proj.*`` (``proj`` + ``norm`` for the plain
projection; ``latents``, ``proj_in``, ``layers.N.0`` (attention), ``layers.N.1`` (feed-forward), ``proj_out``,
``norm_out`` for Plus) and ``ip_adapter.K.to_k_ip.weight`` / ``ip_adapter.K.to_v_ip.weight``, ``K`` being the
index of the cross-attention layer among all of the UNet's attention layers (down blocks, up blocks, middle
block, as the original UNet orders them).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .files import read_weights
from .lora import block_weight, check_block_weights

logger = logging.getLogger(__name__)


class ImageProjection(nn.Module):
    """Pooled CLIP image embedding -> ``num_tokens`` context tokens (a linear map, then layer norm)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        return self.norm(self.proj(image_embeds).reshape(image_embeds.shape[0], self.num_tokens, -1))


class PerceiverAttention(nn.Module):
    """Learned queries attend to the image features and to themselves (Flamingo's perceiver resampler)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, features, latents):
        features, latents = self.norm1(features), self.norm2(latents)
        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)

        def split(t):
            return t.view(t.shape[0], -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q(latents)), split(key), split(value))
        return self.to_out(out.transpose(1, 2).flatten(2))


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter Plus: penultimate CLIP hidden states -> ``num_queries`` context tokens."""

    def __init__(self, embed_dim: int, hidden_dim: int, output_dim: int, depth: int, heads: int, num_queries: int,
                 ff_inner: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, hidden_dim))
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(hidden_dim, heads), _feed_forward(hidden_dim, ff_inner)])
            for _ in range(depth))
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, features):
        latents = self.latents.repeat(features.shape[0], 1, 1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_image_projection(state_dict: dict, source: str) -> nn.Module:
    """The projection a file's ``image_proj`` weights describe, with those weights loaded."""
    if "proj.weight" in state_dict and "norm.weight" in state_dict:
        width = state_dict["norm.weight"].shape[0]
        out, embed = state_dict["proj.weight"].shape
        projection = ImageProjection(embed, width, out // width)
    elif "latents" in state_dict:
        _, queries, hidden = state_dict["latents"].shape
        depth = len({k.split(".")[1] for k in state_dict if k.startswith("layers.")})
        projection = Resampler(embed_dim=state_dict["proj_in.weight"].shape[1], hidden_dim=hidden,
                               output_dim=state_dict["proj_out.weight"].shape[0], depth=depth,
                               heads=state_dict["layers.0.0.to_q.weight"].shape[0] // 64, num_queries=queries,
                               ff_inner=state_dict["layers.0.1.1.weight"].shape[0])
    else:
        raise ValueError(f"{source}: the image_proj weights are neither an IP-Adapter projection (proj, norm) nor "
                         f"an IP-Adapter Plus resampler (latents, proj_in, layers...); keys: {sorted(state_dict)[:6]}")
    missing, unexpected = projection.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: image_proj weights do not fit the projection they describe: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}")
    return projection


class MultiImageProjection(nn.Module):
    """One projection per loaded IP-Adapter; maps the list of image embeddings to a list of token sets."""

    def __init__(self, projections):
        super().__init__()
        self.image_projection_layers = nn.ModuleList(projections)

    def forward(self, image_embeds: list):
        if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != len(self.image_projection_layers):
            raise ValueError(f"added_cond_kwargs['image_embeds'] must be a list with one tensor per IP-Adapter "
                             f"({len(self.image_projection_layers)} loaded)")
        projected = []
        for embeds, projection in zip(image_embeds, self.image_projection_layers):
            # (batch, images, ...) -> project each image -> (batch, images, tokens, width)
            batch, images = embeds.shape[:2]
            tokens = projection(embeds.reshape(batch * images, *embeds.shape[2:]))
            projected.append(tokens.reshape(batch, images, *tokens.shape[1:]))
        return projected


class IPAdapterAttnProcessor(nn.Module):
    """Decoupled cross-attention: the text attention plus, per IP-Adapter, ``scale *`` attention to its image
    tokens through its own key/value projections."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, count: int):
        super().__init__()
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_attention_dim, hidden_size, bias=False) for _ in range(count))
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_attention_dim, hidden_size, bias=False) for _ in range(count))
        self.scale = [1.0] * count  # one per adapter; set_ip_adapter_scale changes them

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("an IP-Adapter is loaded but the UNet got no image embeddings: pass ip_adapter_image= "
                             "or ip_adapter_image_embeds= to the pipeline (added_cond_kwargs['image_embeds'] to the "
                             "UNet), or unload_ip_adapter()")
        text, image_tokens = encoder_hidden_states
        residual = hidden_states
        hidden_states, shape = attn.spatial_in(hidden_states)
        query = attn.to_q(hidden_states)
        out = attn.attend(query, attn.to_k(text), attn.to_v(text), attention_mask)
        for tokens, scale, to_k, to_v in zip(image_tokens, self.scale, self.to_k_ip, self.to_v_ip):
            if _is_zero(scale):
                continue
            tokens = tokens.flatten(1, 2)  # every image of this adapter is context
            out = out + scale * attn.attend(query, to_k(tokens), to_v(tokens))
        out = attn.to_out[1](attn.to_out[0](out))
        out = attn.spatial_out(out, shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _is_zero(scale) -> bool:
    return all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0


class IPAdapter:
    """The IP-Adapter methods of one pipeline (``pipe.load_ip_adapter`` and friends)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._saved = None  # what loading replaced: processors, encoder_hid_proj, its type, added components

    def load_ip_adapter(self, pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                        image_encoder_folder: str | None = "image_encoder", allow_pickle=False, **hub_kwargs):
        """Load one IP-Adapter, or several: lists for the three first arguments, a single value standing for
        all of them."""
        sources = _as_list(pretrained_model_name_or_path_or_dict)
        subfolders, names = _as_list(subfolder), _as_list(weight_name)
        count = max(len(sources), len(subfolders), len(names))
        sources, subfolders, names = (v * count if len(v) == 1 else v for v in (sources, subfolders, names))
        if not len(sources) == len(subfolders) == len(names):
            raise ValueError(f"load_ip_adapter got {len(sources)} sources, {len(subfolders)} subfolders and "
                             f"{len(names)} weight names; pass one of each per IP-Adapter")
        state_dicts = [self._read(source, folder, name, allow_pickle, hub_kwargs)
                       for source, folder, name in zip(sources, subfolders, names)]
        unet = self.pipe.unet
        processors = self._processors(unet, state_dicts)
        projections = MultiImageProjection(
            [build_image_projection(sd["image_proj"], str(source)) for sd, source in zip(state_dicts, sources)])
        self.unload_ip_adapter()  # a new load replaces the IP-Adapters loaded before
        added = self._load_image_encoder(sources[0], subfolders[0], image_encoder_folder, hub_kwargs)

        self._saved = {"processors": unet.attn_processors, "encoder_hid_proj": unet.encoder_hid_proj,
                       "text_encoder_hid_proj": unet.text_encoder_hid_proj,
                       "encoder_hid_dim_type": unet.config.get("encoder_hid_dim_type"), "added": added}
        if unet.config.get("encoder_hid_dim_type") == "text_proj":
            unet.text_encoder_hid_proj = unet.encoder_hid_proj  # keeps projecting the text
        unet.set_attn_processor(processors)
        unet.encoder_hid_proj = projections.to(device=unet.device, dtype=unet.dtype)
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")

    @staticmethod
    def _read(source, subfolder, weight_name, allow_pickle, hub_kwargs) -> dict:
        data = read_weights(source, weight_name, (), subfolder=subfolder, allow_pickle=allow_pickle,
                            what="IP-Adapter", **hub_kwargs)
        if "image_proj" in data and "ip_adapter" in data:  # the pickled layout: two nested dicts
            return data
        groups = {"image_proj": {}, "ip_adapter": {}}
        for key, value in data.items():
            group, _, rest = key.partition(".")
            if group not in groups:
                raise ValueError(f"IP-Adapter weights {weight_name or 'state dict'}: key {key!r} is in neither the "
                                 f"'image_proj.' nor the 'ip_adapter.' group")
            groups[group][rest] = value
        return groups

    def _processors(self, unet, state_dicts) -> dict:
        """IP-Adapter processors for the cross-attention layers; the others keep theirs."""
        processors = dict(unet.attn_processors)
        layers = dict(unet.named_modules())
        for index, name in enumerate(processors):
            attn = layers[name.removesuffix(".processor")]
            if name.endswith("attn1.processor"):
                continue
            processor = IPAdapterAttnProcessor(attn.to_q.out_features, attn.cross_attention_dim, len(state_dicts))
            weights = {}
            for i, sd in enumerate(state_dicts):
                for kind in ("to_k_ip", "to_v_ip"):
                    key = f"{index}.{kind}.weight"
                    if key not in sd["ip_adapter"]:
                        raise ValueError(f"IP-Adapter weights lack ip_adapter.{key} for {name}: they were made for "
                                         f"a UNet with other attention layers")
                    weights[f"{kind}.{i}.weight"] = sd["ip_adapter"][key]
            try:
                processor.load_state_dict(weights)
            except RuntimeError as e:
                raise ValueError(f"IP-Adapter weights do not fit {name}: {e}") from None
            processors[name] = processor.to(device=unet.device, dtype=unet.dtype)
        return processors

    def _load_image_encoder(self, source, subfolder, image_encoder_folder, hub_kwargs) -> list[str]:
        """Load the CLIP image encoder and make a feature extractor where the pipeline lacks them; returns the
        names of the components added (unloading removes them again)."""
        added = []
        if getattr(self.pipe, "image_encoder", None) is None:
            if image_encoder_folder is None:
                # Enough for calls that bring their own embeddings (ip_adapter_image_embeds).
                logger.warning("no image encoder was loaded (image_encoder_folder=None): calls must pass "
                               "ip_adapter_image_embeds=, not ip_adapter_image=")
            elif isinstance(source, dict):
                raise ValueError("IP-Adapter weights given as a dict come without an image encoder; build the "
                                 "pipeline with image_encoder=..., or pass image_encoder_folder=None and call it "
                                 "with ip_adapter_image_embeds=")
            else:
                from transformers import CLIPVisionModelWithProjection

                folder = image_encoder_folder if "/" in image_encoder_folder \
                    else "/".join(p for p in (subfolder, image_encoder_folder) if p)
                encoder = CLIPVisionModelWithProjection.from_pretrained(source, subfolder=folder, **hub_kwargs)
                self.pipe.register_modules(image_encoder=encoder.to(self.pipe.device, self.pipe.unet.dtype))
                added.append("image_encoder")
        if getattr(self.pipe, "feature_extractor", None) is None:
            from transformers import CLIPImageProcessor

            encoder = getattr(self.pipe, "image_encoder", None)
            size = encoder.config.image_size if encoder is not None else 224  # CLIP ViT's input size
            self.pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
            added.append("feature_extractor")
        return added

    def set_ip_adapter_scale(self, scale):
        """One scale for all IP-Adapters, a list with one per adapter; each may be a per-block dict
        (``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}``) whose blocks left out get 0."""
        unet = self.pipe.unet
        scales = scale if isinstance(scale, list) else [scale]
        for value in scales:
            if isinstance(value, dict):
                check_block_weights(value, unet)
        found = False
        for name, processor in unet.attn_processors.items():
            if not isinstance(processor, IPAdapterAttnProcessor):
                continue
            found = True
            if len(scales) not in (1, len(processor.scale)):
                raise ValueError(f"set_ip_adapter_scale got {len(scales)} scales for {len(processor.scale)} "
                                 f"IP-Adapters; pass one scale, or one per adapter")
            path = name.removesuffix(".processor")
            processor.scale = [block_weight(value, path, default=0.0) if isinstance(value, dict) else value
                               for value in scales * (len(processor.scale) // len(scales))]
        if not found:
            raise ValueError("no IP-Adapter is loaded; call load_ip_adapter first")

    def image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, batch: int, guidance: bool) -> list:
        """``added_cond_kwargs["image_embeds"]`` for a call: one tensor per IP-Adapter, ``(batch, images, ...)``,
        the unconditional half first when ``guidance`` is on (a zero embedding for the pooled embedding, the
        encoding of all-zero pixels for Plus' hidden states, as the adapters were trained)."""
        projections = self._projections()
        if ip_adapter_image_embeds is not None:
            if not isinstance(ip_adapter_image_embeds, list) or ip_adapter_image_embeds[0].ndim not in (3, 4):
                raise ValueError("ip_adapter_image_embeds must be a list of 3-D or 4-D tensors, one per IP-Adapter "
                                 "(with guidance on, the unconditional half first)")
            if len(ip_adapter_image_embeds) != len(projections):
                raise ValueError(f"ip_adapter_image_embeds has {len(ip_adapter_image_embeds)} tensors for "
                                 f"{len(projections)} IP-Adapters; pass one tensor per adapter")
            if guidance and any(e.shape[0] % 2 for e in ip_adapter_image_embeds):
                raise ValueError("with classifier-free guidance on, each ip_adapter_image_embeds tensor stacks the "
                                 "unconditional embeddings over the conditional ones (an even first dimension); "
                                 "compute them with guidance on, or call with guidance_scale <= 1")
            pairs = [e.chunk(2) if guidance else (None, e) for e in ip_adapter_image_embeds]
        else:
            images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
            if len(images) != len(projections):
                raise ValueError(f"ip_adapter_image has {len(images)} entries for {len(projections)} IP-Adapters; "
                                 f"pass one image (or list of images) per adapter")
            pairs = [self._encode(image, not isinstance(projection, ImageProjection))
                     for image, projection in zip(images, projections)]
        embeds = []
        for negative, positive in pairs:
            positive = torch.cat([positive] * batch)
            if guidance:
                positive = torch.cat([torch.cat([negative] * batch), positive])
            embeds.append(positive.to(self.pipe.device))
        return embeds

    def _encode(self, image, hidden_states: bool):
        encoder = getattr(self.pipe, "image_encoder", None)
        if encoder is None:
            raise ValueError("ip_adapter_image needs the pipeline's image_encoder, and it has none (the IP-Adapter "
                             "was loaded with image_encoder_folder=None); pass ip_adapter_image_embeds= instead, or "
                             "build the pipeline with image_encoder=...")
        dtype = next(encoder.parameters()).dtype
        if not torch.is_tensor(image):
            image = self.pipe.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=self.pipe.device, dtype=dtype)
        if hidden_states:
            positive = encoder(image, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
        else:
            positive = encoder(image).image_embeds
            negative = torch.zeros_like(positive)
        return negative[None], positive[None]

    def _projections(self):
        projection = self.pipe.unet.encoder_hid_proj
        if self._saved is None or not isinstance(projection, MultiImageProjection):
            raise ValueError("ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter; call "
                             "pipe.load_ip_adapter(...) first")
        return projection.image_projection_layers

    def unload_ip_adapter(self):
        """Remove the IP-Adapter: the UNet's processors and projection, and the components loading added."""
        if self._saved is None:
            return
        unet, saved = self.pipe.unet, self._saved
        unet.set_attn_processor(saved["processors"])
        unet.encoder_hid_proj = saved["encoder_hid_proj"]
        unet.text_encoder_hid_proj = saved["text_encoder_hid_proj"]
        unet.register_to_config(encoder_hid_dim_type=saved["encoder_hid_dim_type"])
        for name in saved["added"]:
            self.pipe.register_modules(**{name: None})
        self._saved = None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
