"""A CLIP byte-level BPE vocabulary of our own, in which every word of the shapes grammar is one token.

CLIP's tokenizer lower-cases the text, splits it into words, marks each word's last symbol with "</w>" and then
applies the BPE merges, lowest rank first, to the word's byte characters. The vocabulary written here has the
same layout as CLIP's: the 256 byte characters, the same 256 with "</w>", the merged tokens, and the two special
tokens last. Merges are added word by word: for each word we run BPE with the merges so far and append the merges
that join whatever pieces remain, left to right. Appended merges rank below all earlier ones, so they never change
how an earlier word is split, and every grammar word ends up a single "word</w>" token. Any other text still
tokenizes, byte by byte.

Run ``python -m shapes.tokenizer FOLDER`` (from ``training/``) to write vocab.json, merges.txt and the tokenizer
config into FOLDER.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .data import BACKGROUNDS, COLOURS, SHAPES

# Long enough for the longest prompt ("a purple triangle on a black background" is 7 words + 2 specials) with
# room to spare; the text encoder's position table has exactly this many entries.
MODEL_MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
GRAMMAR_WORDS = ("a", *COLOURS, *SHAPES, "on", *BACKGROUNDS, "background")


def byte_characters() -> list[str]:
    """The printable character that byte-level BPE uses for each byte 0..255 (GPT-2's table): printable bytes
    stand for themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return [table[b] for b in range(256)]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE to one word's symbols: merge the lowest-ranked adjacent pair until none is known."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        first, second = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):  # merge every occurrence of the pair, as BPE does
            if j + 1 < len(symbols) and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def grammar_merges(words=GRAMMAR_WORDS) -> list[tuple[str, str]]:
    """The merges that turn each of ``words`` into one "word</w>" token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return merges


def write_vocabulary(folder, model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_characters()
    merges = grammar_merges()
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


def build_tokenizer(folder, model_max_length: int = MODEL_MAX_LENGTH):
    """Write the vocabulary into ``folder`` and load it as a ``transformers.CLIPTokenizer``; checks that every
    grammar word is one token."""
    from transformers import CLIPTokenizer

    folder = write_vocabulary(folder, model_max_length)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    for word in GRAMMAR_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if ids != [tokenizer.convert_tokens_to_ids(word + "</w>")]:
            raise RuntimeError(f"the grammar word {word!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}, "
                               f"not to one token; the merges in {folder / 'merges.txt'} are wrong")
    return tokenizer


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shapes.tokenizer FOLDER")
    print(build_tokenizer(sys.argv[1]))
