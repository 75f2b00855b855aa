"""The shapes world: a seeded procedural dataset of coloured shapes and the tokenizer for its prompts.

Everything diffloom's built-in text-to-image model knows comes from here: ``data`` draws images and their
prompts, ``tokenizer`` writes the byte-level BPE vocabulary that spells every word of the grammar as one token.
"""

from .data import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, all_prompts, prompt_for, render, sample_batch
from .tokenizer import GRAMMAR_WORDS, MODEL_MAX_LENGTH, build_tokenizer

__all__ = ["BACKGROUNDS", "COLOURS", "IMAGE_SIZE", "SHAPES", "all_prompts", "prompt_for", "render", "sample_batch",
           "GRAMMAR_WORDS", "MODEL_MAX_LENGTH", "build_tokenizer"]
