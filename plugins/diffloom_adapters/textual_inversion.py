"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): new words for the text encoder.

An embedding file holds one or more learned vectors for a token. Loading adds the token to the tokenizer and
its vectors as new rows of the text encoder's input embedding. An embedding of ``n > 1`` vectors becomes the
tokens ``tok``, ``tok_1`` ... ``tok_{n-1}``, and the pipeline asks this adapter to rewrite prompts
(``maybe_convert_prompt``) so that ``tok`` stands for all of them. Like diffusers, it reads the added words from
the tokenizer itself, so a pipeline saved with an embedding loaded and read back behaves the same.

File layouts read: diffusers' ``{token: tensor}``, A1111's ``{"string_to_param": {"*": tensor}, "name": ...}``
(pickled) and ``{"emb_params": tensor}`` (safetensors, the token being the file name unless ``token=`` is
given), and a bare tensor (``token=`` required). Pickle files follow the core rule: refused unless
``allow_pickle=True``, then read with ``torch.load(weights_only=True)``.

Where diffloom departs from diffusers on purpose: an A1111 ``emb_params`` file is named after its file (diffusers
names its word ``emb_params``), and unloading a multi-vector token also removes its ``tok_1`` ... companions.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .files import read_weights

_DEFAULT_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
_HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "force_download", "proxies")


class TextualInversionAdapter:
    """The textual inversion methods of one pipeline (``pipe.load_textual_inversion`` and friends)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def load_textual_inversion(self, pretrained_model_name_or_path, token=None, tokenizer=None, text_encoder=None,
                               weight_name: str | None = None, subfolder: str | None = None, allow_pickle=False,
                               use_safetensors: bool | None = None, **kwargs):
        """Load one embedding or a list of them (``token`` then a matching list, or None). Hub options are
        diffusers' (``revision``, ``cache_dir``, ``hf_token`` for the Hub token, as ``token`` names the word)."""
        tokenizer = tokenizer if tokenizer is not None else getattr(self.pipe, "tokenizer", None)
        text_encoder = text_encoder if text_encoder is not None else getattr(self.pipe, "text_encoder", None)
        if tokenizer is None or text_encoder is None:
            raise ValueError("load_textual_inversion needs a tokenizer and a text encoder; this pipeline has none, "
                             "pass tokenizer= and text_encoder=")
        hub_kwargs = {k: kwargs.pop(k) for k in _HUB_OPTIONS if k in kwargs}
        if "hf_token" in kwargs:
            hub_kwargs["token"] = kwargs.pop("hf_token")
        if kwargs:
            warnings.warn(f"load_textual_inversion ignores {', '.join(sorted(kwargs))} (diffusers ignores them too)",
                          stacklevel=2)
        sources = pretrained_model_name_or_path if isinstance(pretrained_model_name_or_path, list) \
            else [pretrained_model_name_or_path]
        tokens = token if isinstance(token, list) else [token]
        if len(sources) > 1 and tokens == [None]:
            tokens = tokens * len(sources)
        named = [t for t in tokens if t is not None]
        if len(set(named)) < len(named):
            raise ValueError(f"token= lists the same word twice ({tokens}); give each embedding its own token")
        if len(sources) == 1 and len(tokens) > 1 and torch.is_tensor(sources[0]):
            if sources[0].ndim == 2:
                # One tensor of n vectors for n tokens (SDXL pivotal-tuning files: "<s0>", "<s1>"): a vector each.
                sources = list(sources[0])
        elif len(sources) == 1 and len(tokens) > 1:
            warnings.warn(f"one embedding file but {len(tokens)} tokens: it is loaded as {tokens[0]!r} and "
                          f"{tokens[1:]} are unused (as in diffusers)", stacklevel=2)
            tokens = tokens[:1]
        if len(tokens) != len(sources):
            raise ValueError(f"got {len(sources)} embeddings but {len(tokens)} tokens; pass one token per embedding")

        vocab = tokenizer.get_vocab()
        width = text_encoder.get_input_embeddings().embedding_dim
        new_tokens, new_vectors = [], []
        for source, name in zip(sources, tokens):
            name, vectors = self._read(source, name, weight_name, subfolder, allow_pickle, use_safetensors,
                                       hub_kwargs)
            if vectors.shape[-1] != width:
                raise ValueError(f"the embedding for {name!r} has vectors of size {vectors.shape[-1]}, but the text "
                                 f"encoder's embeddings have size {width}: it was trained for another text encoder")
            if vectors.ndim > 2 and any(n != 1 for n in vectors.shape[1:-1]):
                raise ValueError(f"the embedding for {name!r} has shape {tuple(vectors.shape)}; an embedding is one "
                                 f"vector ({width},) or a stack of them (n, {width})")
            vectors = vectors.reshape(-1 if vectors.ndim > 1 else 1, width)
            names = [name] + [f"{name}_{i}" for i in range(1, vectors.shape[0])]
            taken = [n for n in names if n in vocab]
            if taken:
                raise ValueError(f"token {taken[0]!r} is already in the tokenizer's vocabulary; pass token= to load "
                                 f"the embedding under another name, or unload_textual_inversion({taken[0]!r})")
            new_tokens += names
            new_vectors.append(vectors)

        tokenizer.add_tokens(new_tokens)
        ids = tokenizer.convert_tokens_to_ids(new_tokens)
        text_encoder.resize_token_embeddings(len(tokenizer))
        embedding = text_encoder.get_input_embeddings()
        with torch.no_grad():
            embedding.weight[ids] = torch.cat(new_vectors).to(embedding.weight.device, embedding.weight.dtype)

    @staticmethod
    def _read(source, token, weight_name, subfolder, allow_pickle, use_safetensors, hub_kwargs):
        """``(token, vectors)`` of one embedding source."""
        if torch.is_tensor(source):
            data = source
        else:
            data = read_weights(source, weight_name, _DEFAULT_FILES, subfolder=subfolder, allow_pickle=allow_pickle,
                                use_safetensors=use_safetensors, what="textual inversion", **hub_kwargs)
        where = "the state dict" if isinstance(source, dict) else source
        if torch.is_tensor(data):
            if token is None:
                raise ValueError("this embedding is a bare tensor, which names no token; pass token=")
            return token, data.detach()
        if "string_to_param" in data:  # A1111, pickled
            if "name" not in data:
                raise ValueError(f"{where} is an A1111 embedding without its 'name' entry, which diffusers needs "
                                 f"(even with token=); add data['name'] = '<your-token>' to it")
            loaded, vectors = data["name"], data["string_to_param"]["*"]
        elif set(data) == {"emb_params"}:  # A1111, safetensors: the file's name is the word
            loaded = Path(os.fspath(source)).stem if isinstance(source, (str, os.PathLike)) else None
            vectors = data["emb_params"]
        elif len(data) == 1:  # diffusers
            (loaded, vectors), = data.items()
        else:
            hint = ("; an SDXL embedding holds a tensor per text encoder: load its 'clip_l' tensor with "
                    "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer and its 'clip_g' tensor with "
                    "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2") \
                if {"clip_l", "clip_g"} <= set(data) else ""
            raise ValueError(f"{where} is no textual inversion embedding: expected one {{token: tensor}} entry, "
                             f"'string_to_param' or 'emb_params', found keys {sorted(data)[:6]}{hint}")
        token = token or loaded
        if token is None:
            raise ValueError("the embedding names no token; pass token=")
        return token, vectors.detach()

    def maybe_convert_prompt(self, prompt, tokenizer):
        """Spell out multi-vector tokens: ``"a <cat>"`` becomes ``"a <cat> <cat>_1 <cat>_2"``."""
        added = added_words(tokenizer)
        if not added or prompt is None:
            return prompt
        if isinstance(prompt, list):
            return [self._convert(p, tokenizer, added) for p in prompt]
        return self._convert(prompt, tokenizer, added)

    @staticmethod
    def _convert(prompt: str, tokenizer, added: set[str]) -> str:
        for token in dict.fromkeys(tokenizer.tokenize(prompt)):
            if token in added and f"{token}_1" in added:
                extra = []
                while f"{token}_{len(extra) + 1}" in added:
                    extra.append(f"{token}_{len(extra) + 1}")
                prompt = prompt.replace(token, " ".join([token, *extra]))
        return prompt

    def unload_textual_inversion(self, tokens=None, tokenizer=None, text_encoder=None):
        """Remove added words (all of them by default) from the tokenizer and their rows from the text encoder."""
        tokenizer = tokenizer if tokenizer is not None else self.pipe.tokenizer
        text_encoder = text_encoder if text_encoder is not None else self.pipe.text_encoder
        added = added_words(tokenizer)
        if tokens is None:
            remove = sorted(added)
        else:
            asked = [tokens] if isinstance(tokens, str) else list(tokens)
            if not any(t in added for t in asked):  # as in diffusers, only a request that removes nothing fails
                raise ValueError(f"tokens {asked} were not loaded by load_textual_inversion; loaded: "
                                 f"{sorted(added)}")
            # A multi-vector token goes with its _1, _2 ... companions.
            companions = re.compile("|".join(re.escape(a) + r"_\d+" for a in asked))
            remove = [t for t in added if t in asked or companions.fullmatch(t)]
        if not remove:
            return
        ids = set(tokenizer.convert_tokens_to_ids(remove))
        _remove_added_tokens(tokenizer, set(remove))
        embedding = text_encoder.get_input_embeddings()
        keep = [i for i in range(embedding.weight.shape[0]) if i not in ids]
        smaller = nn.Embedding(len(keep), embedding.embedding_dim, device=embedding.weight.device,
                               dtype=embedding.weight.dtype)
        with torch.no_grad():
            smaller.weight.copy_(embedding.weight[keep])
        text_encoder.set_input_embeddings(smaller)
        text_encoder.config.vocab_size = len(keep)


def added_words(tokenizer) -> set[str]:
    """The words added to ``tokenizer`` after training (loaded embeddings), special tokens aside."""
    if tokenizer is None:
        return set()
    return set(tokenizer.added_tokens_encoder) - set(tokenizer.all_special_tokens)


def _remove_added_tokens(tokenizer, remove: set[str]):
    """Drop added tokens from a fast tokenizer, renumbering the later ones so the ids stay contiguous.

    The tokenizers library has no call that removes a token, so its serialised form is edited and read back.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer, whose added tokens "
                         f"cannot be removed; reload the tokenizer instead")
    spec = json.loads(backend.to_str())
    kept, removed_before = [], 0
    for added in sorted(spec.get("added_tokens", []), key=lambda t: t["id"]):
        if added["content"] in remove:
            removed_before += 1
            continue
        added["id"] -= removed_before
        kept.append(added)
    spec["added_tokens"] = kept
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
