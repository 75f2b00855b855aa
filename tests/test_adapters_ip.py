"""IP-Adapter (plain and Plus) on the tiny Stable Diffusion pipeline, against diffusers loading the same folder.

The folder is laid out as published IP-Adapters are: ``models/<weights>.safetensors`` (``image_proj.*`` and
``ip_adapter.K.to_k_ip/to_v_ip``) and ``models/image_encoder`` (a tiny CLIPVisionModelWithProjection).
"""

import diffusers
import numpy as np
import pytest
import torch
from diffusers.callbacks import IPAdapterScaleCutoffCallback as RefCutoff
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import tiny
from diffloom import IPAdapterScaleCutoffCallback, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

TOL = 2e-4
VISION_HIDDEN, IMAGE_EMBED = 16, 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(unet, plus: bool, seed: int) -> dict:
    """Random IP-Adapter weights in the published layout for ``unet`` (a diffusers UNet)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    width = unet.config.cross_attention_dim
    sd = {}
    if plus:
        hidden, inner, queries = 64, 256, 3  # diffusers fixes the feed-forward ratio at 4
        sd["image_proj.latents"] = rand(1, queries, hidden)
        sd["image_proj.proj_in.weight"], sd["image_proj.proj_in.bias"] = rand(hidden, VISION_HIDDEN), rand(hidden)
        for i in range(4):  # diffusers builds four resampler layers
            p = f"image_proj.layers.{i}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + rand(hidden), rand(hidden)
            sd[p + "0.to_q.weight"], sd[p + "0.to_kv.weight"] = rand(64, hidden), rand(128, hidden)
            sd[p + "0.to_out.weight"] = rand(hidden, 64)
            sd[p + "1.1.weight"], sd[p + "1.3.weight"] = rand(inner, hidden), rand(hidden, inner)
        sd["image_proj.proj_out.weight"], sd["image_proj.proj_out.bias"] = rand(width, hidden), rand(width)
        sd["image_proj.norm_out.weight"], sd["image_proj.norm_out.bias"] = 1 + rand(width), rand(width)
    else:
        sd["image_proj.proj.weight"], sd["image_proj.proj.bias"] = rand(4 * width, IMAGE_EMBED), rand(4 * width)
        sd["image_proj.norm.weight"], sd["image_proj.norm.bias"] = 1 + rand(width), rand(width)
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            sd[f"ip_adapter.{index}.to_k_ip.weight"] = rand(attn.to_k.out_features, width)
            sd[f"ip_adapter.{index}.to_v_ip.weight"] = rand(attn.to_v.out_features, width)
    return sd


@pytest.fixture(scope="module")
def ip_folder(tiny_sd_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip-adapter")
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    (folder / "models").mkdir()
    save_file(weights(unet, plus=False, seed=1), str(folder / "models" / "ip.safetensors"))
    save_file(weights(unet, plus=True, seed=2), str(folder / "models" / "ip-plus.safetensors"))
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=IMAGE_EMBED)
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder / "models" / "image_encoder")
    return folder


@pytest.fixture(scope="module")
def ours(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd(ours, tiny_sd_path):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref.set_progress_bar_config(disable=True)
    yield ours, ref
    ours.unload_ip_adapter()


def run(pipe, **kwargs):
    kwargs = {"prompt": "a photo of the cat", "num_inference_steps": 3, "height": tiny.IMAGE_HEIGHT,
              "width": tiny.IMAGE_WIDTH, "output_type": "np", "generator": torch.Generator().manual_seed(0),
              **kwargs}
    return pipe(**kwargs).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("weight_name", ["ip.safetensors", "ip-plus.safetensors"])
def test_ip_adapter_scales_and_cutoff(sd, ip_folder, weight_name):
    ours, ref = sd
    base = run(ours)
    image = tiny.image(seed=3)
    for pipe in (ours, ref):
        pipe.load_ip_adapter(ip_folder, subfolder="models", weight_name=weight_name)
    assert ours.image_encoder is not None and ours.feature_extractor is not None
    a = run(ours, ip_adapter_image=image)
    assert max_diff(a, run(ref, ip_adapter_image=image)) <= TOL
    assert max_diff(a, base) > 1e-2
    for scale in (0.5, {"down": 0.3, "mid": 1.2, "up": {"block_1": [0.0, 1.0]}}):
        for pipe in (ours, ref):
            pipe.set_ip_adapter_scale(scale)
        assert max_diff(run(ours, ip_adapter_image=image), run(ref, ip_adapter_image=image)) <= TOL
    for pipe in (ours, ref):
        pipe.set_ip_adapter_scale(0.8)
    a = run(ours, ip_adapter_image=image, callback_on_step_end=IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5))
    b = run(ref, ip_adapter_image=image, callback_on_step_end=RefCutoff(cutoff_step_ratio=0.5))
    assert max_diff(a, b) <= TOL

    ours.unload_ip_adapter()
    assert ours.image_encoder is None and ours.feature_extractor is None
    assert max_diff(run(ours), base) == 0


def test_image_embeds_and_two_adapters(sd, ip_folder):
    ours, ref = sd
    image = tiny.image(seed=4)
    for pipe in (ours, ref):
        pipe.load_ip_adapter(ip_folder, subfolder="models", weight_name=["ip.safetensors", "ip-plus.safetensors"])
        pipe.set_ip_adapter_scale([0.6, 0.9])
    kw = {"ip_adapter_image": [image, image], "num_images_per_prompt": 2}
    a = run(ours, **kw)
    assert max_diff(a, run(ref, **kw)) <= TOL
    embeds = ref.prepare_ip_adapter_image_embeds([image, image], None, "cpu", 1, True)
    # Precomputed embeddings (unconditional half first) give the same images.
    assert max_diff(run(ours, ip_adapter_image_embeds=embeds, num_images_per_prompt=2), a) <= TOL


def test_img2img_shares_the_adapter(sd, ip_folder):
    ours, ref = sd
    for pipe in (ours, ref):
        pipe.load_ip_adapter(ip_folder, subfolder="models", weight_name="ip.safetensors")
    ours2 = StableDiffusionImg2ImgPipeline.from_pipe(ours)
    ref2 = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(ref)
    kw = {"image": tiny.image(seed=5), "ip_adapter_image": tiny.image(seed=6), "strength": 0.7}
    a = ours2(prompt="a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0),
              **kw).images
    b = ref2(prompt="a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0),
             **kw).images
    assert max_diff(a, b) <= TOL


def test_errors(sd, ip_folder):
    ours, _ = sd
    with pytest.raises(ValueError, match="load_ip_adapter"):
        run(ours, ip_adapter_image=tiny.image())
    ours.load_ip_adapter(ip_folder, subfolder="models", weight_name="ip.safetensors")
    with pytest.raises(ValueError, match="image_embeds"):
        run(ours)
    with pytest.raises(ValueError, match="2 entries for 1"):
        run(ours, ip_adapter_image=[tiny.image(), tiny.image()])
    with pytest.raises(ValueError, match="2 scales for 1"):
        ours.set_ip_adapter_scale([0.5, 0.5])
    bad = weights(ours.unet, plus=False, seed=0)
    bad["extra.key"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra.key"):
        ours.load_ip_adapter(bad, subfolder=None, weight_name=None)
