"""Shared fixtures: tiny pipeline folders written by diffusers, built once per test session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so test files can `import tiny`

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    """A tiny Stable Diffusion (text-to-image) folder, 4-channel UNet, no safety checker."""
    return tiny.save_sd_folder(tmp_path_factory.mktemp("tiny-sd") / "pipe")


@pytest.fixture(scope="session")
def tiny_sd_inpaint_path(tmp_path_factory):
    """A tiny Stable Diffusion inpainting folder (9-channel UNet)."""
    return tiny.save_sd_folder(tmp_path_factory.mktemp("tiny-sd-inpaint") / "pipe", in_channels=9)


@pytest.fixture(scope="session")
def tiny_ddpm_path(tmp_path_factory):
    """A tiny DDPM folder (pixel-space UNet2DModel, 8x8 RGB)."""
    return tiny.save_ddpm_folder(tmp_path_factory.mktemp("tiny-ddpm") / "pipe")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and several threads spin badly on a busy 2-core machine.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
