"""A pytest plugin for people who write diffloom plugins (loaded through the ``pytest11`` entry point).

Fixtures:

* ``diffloom_registry``: a fresh :class:`~diffloom.registry.Registry` that ignores installed plugins; register
  yours with ``diffloom_registry.register_plugin(my_plugin)`` and ask it what it provides.
* ``register_temporarily``: ``register_temporarily(plugin)`` adds a plugin object to the registry everything
  uses (so ``from diffloom import MyPipeline`` and loop hooks see it) for one test, and removes it afterwards.
* tiny components, seeded, built without network: ``tiny_unet2d``, ``tiny_unet2d_condition``, ``tiny_vae``,
  ``tiny_scheduler`` (DDPM), ``tiny_clip_tokenizer``, ``tiny_clip_text_encoder`` and ``tiny_ddpm_folder`` (a
  pipeline folder in the diffusers layout with a ``unet`` and a ``scheduler``).

Importing this module imports neither torch nor a model: pytest loads it in every session of every project that
has diffloom installed, so the heavy imports happen inside the fixtures.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

TEXT_HIDDEN = 32  # the tiny text encoder's width, which the tiny conditional UNet attends to


@contextmanager
def _seeded(seed):
    """Build with a fixed seed without disturbing the test's own random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@pytest.fixture
def diffloom_registry():
    """An empty registry, isolated from installed plugins and from the registry everything else uses."""
    from diffloom.registry import Registry

    return Registry(autoload=False)


@pytest.fixture
def register_temporarily():
    """``register_temporarily(plugin, name=None) -> name``: registered in the shared registry for one test."""
    from diffloom.registry import registry

    names = []

    def register(plugin, name=None):
        names.append(registry.register_plugin(plugin, name))
        return names[-1]

    yield register
    for name in reversed(names):
        registry.unregister_plugin(name)


def build_tiny_unet2d(seed=0):
    from diffloom import UNet2DModel

    with _seeded(seed):
        return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                           attention_head_dim=4).eval()


def build_tiny_unet2d_condition(seed=0, in_channels=4):
    from diffloom import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=2,
                                    norm_num_groups=4).eval()


def build_tiny_vae(seed=0):
    from diffloom import AutoencoderKL

    with _seeded(seed):
        # Four levels, so images are 8 times the latents' size, as in Stable Diffusion.
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
                             block_out_channels=(4, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4).eval()


def build_tiny_scheduler():
    from diffloom import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)


def _byte_symbols() -> list[str]:
    """Byte-level BPE's printable stand-in for each of the 256 bytes (the GPT-2 table CLIP uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    code = dict(zip(printable + others, printable + [256 + i for i in range(len(others))]))
    return [chr(code[b]) for b in range(256)]


_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>", "c a", "ca t</w>", "d o", "do g</w>"]


def write_tiny_clip_vocab(folder):
    """``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE: every byte, a few merges, the two special tokens."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return folder


def build_tiny_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    folder = write_tiny_clip_vocab(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build_tiny_clip_text_encoder(tokenizer, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=TEXT_HIDDEN, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with _seeded(seed):
        return CLIPTextModel(config).eval()


def write_tiny_ddpm_folder(folder, seed=0):
    """A DDPM pipeline folder in the diffusers layout (``unet`` + ``scheduler``); returns its path."""
    from pathlib import Path

    from diffloom.configuration import DIFFUSERS_FORMAT_VERSION

    folder = Path(folder)
    build_tiny_unet2d(seed).save_pretrained(folder / "unet")
    build_tiny_scheduler().save_pretrained(folder / "scheduler")
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


@pytest.fixture
def tiny_unet2d():
    return build_tiny_unet2d()


@pytest.fixture
def tiny_unet2d_condition():
    return build_tiny_unet2d_condition()


@pytest.fixture
def tiny_vae():
    return build_tiny_vae()


@pytest.fixture
def tiny_scheduler():
    return build_tiny_scheduler()


@pytest.fixture
def tiny_clip_tokenizer(tmp_path_factory):
    return build_tiny_clip_tokenizer(tmp_path_factory.mktemp("tiny-clip-vocab"))


@pytest.fixture
def tiny_clip_text_encoder(tiny_clip_tokenizer):
    return build_tiny_clip_text_encoder(tiny_clip_tokenizer)


@pytest.fixture
def tiny_ddpm_folder(tmp_path_factory):
    return write_tiny_ddpm_folder(tmp_path_factory.mktemp("tiny-ddpm") / "ddpm")
