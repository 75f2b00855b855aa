"""float16 on a CUDA GPU: diffloom's SD and SDXL pipelines against diffusers', on tiny folders diffusers wrote.

Both libraries load the same folder in float16, run on the GPU from the same seed (a CUDA generator), and must
give the same images within float16 rounding. Skipped where CUDA is absent.
"""

import diffusers
import numpy as np
import pytest
import torch

import diffloom
import tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Images are in [0, 1]; float16 keeps about 3 decimal digits, and kernels may order sums differently.
TOL = 5e-3


def run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a photo of the red cat", "the dog"], height=tiny.IMAGE_HEIGHT, width=tiny.IMAGE_WIDTH,
               num_inference_steps=4, output_type="np", generator=torch.Generator("cuda").manual_seed(0), **kwargs)
    return np.asarray(out.images, dtype=np.float32)


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    return tiny.save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl") / "pipe")


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_sd_float16_matches_diffusers(tiny_sd_path, guidance_scale):
    ours = diffloom.StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16).to("cuda")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16).to("cuda")
    assert ours.unet.dtype == torch.float16 and ours.device.type == "cuda"
    a, b = run(ours, guidance_scale=guidance_scale), run(ref, guidance_scale=guidance_scale)
    assert np.isfinite(a).all() and a.std() > 0, "the images are not finite or are flat"
    assert np.abs(a - b).max() <= TOL, f"max abs difference {np.abs(a - b).max()}"


def test_sdxl_float16_matches_diffusers(tiny_sdxl_path):
    ours = diffloom.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, torch_dtype=torch.float16).to("cuda")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path, torch_dtype=torch.float16).to("cuda")
    a, b = run(ours), run(ref)
    assert np.isfinite(a).all() and a.std() > 0, "the images are not finite or are flat"
    assert np.abs(a - b).max() <= TOL, f"max abs difference {np.abs(a - b).max()}"
