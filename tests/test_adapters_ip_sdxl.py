"""IP-Adapter on the SDXL pipelines (text-to-image, image-to-image, inpainting, ControlNet) against diffusers.

The UNet is SDXL's layout in miniature: no attention in the first level, two transformer layers per block after it
(and in the middle block), two resnets per level, so the ``ip_adapter.K`` numbering, the per-block scales
(``{"down": {"block_1": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}``, InstantStyle's) and the SDXL
``added_cond_kwargs`` (text_embeds, time_ids, image_embeds) are all exercised.

The IP-Adapter folder is laid out as h94/IP-Adapter publishes it: ``sdxl_models/ip-adapter_sdxl.safetensors`` with
its own image encoder in ``sdxl_models/image_encoder`` (a tiny stand-in for OpenCLIP bigG), and the ViT-H adapters
``sdxl_models/ip-adapter_sdxl_vit-h.safetensors`` / ``ip-adapter-plus_sdxl_vit-h.safetensors`` that read
``models/image_encoder`` (a smaller stand-in for ViT-H, of another image size). The SD v1 ControlNet pipeline, which
shares its file with the SDXL one, is checked here too.
"""

import inspect

import diffusers
import numpy as np
import pytest
import torch
from diffusers.callbacks import IPAdapterScaleCutoffCallback as RefCutoff
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import diffloom
import tiny
from diffloom import IPAdapterScaleCutoffCallback

TOL = 1e-4
H, W = tiny.IMAGE_HEIGHT, tiny.IMAGE_WIDTH
BIGG = {"hidden_size": 24, "projection_dim": 20, "image_size": 32}  # sdxl_models/image_encoder
VIT_H = {"hidden_size": 16, "projection_dim": 12, "image_size": 24}  # models/image_encoder
PLAIN, PLUS = "ip-adapter_sdxl.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"
PLAIN_VIT_H = "ip-adapter_sdxl_vit-h.safetensors"
KINDS = ["text2img", "img2img", "inpaint", "controlnet"]
PARITY: dict[str, float] = {}  # case -> max abs difference to diffusers, printed at the end of the module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sdxl_unet(in_channels: int, seed: int):
    config = dict(tiny.sdxl_unet_config(in_channels), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2))
    torch.manual_seed(seed)
    return tiny._perturbed(diffusers.UNet2DConditionModel(**config), seed + 1)


def ip_weights(unet, seed: int, embed_dim: int | None = None, plus_from: int | None = None) -> dict:
    """Random IP-Adapter weights in the published layout for ``unet``: a plain projection of ``embed_dim``
    pooled features, or (``plus_from``) a Plus resampler over hidden states of that width."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    width = unet.config.cross_attention_dim
    sd = {}
    if plus_from is not None:
        hidden, queries, inner = 64, 4, 256  # 2 heads of 64 (diffusers reads heads off to_q), feed-forward x4
        sd["image_proj.latents"] = rand(1, queries, hidden)
        sd["image_proj.proj_in.weight"], sd["image_proj.proj_in.bias"] = rand(hidden, plus_from), rand(hidden)
        for i in range(4):  # diffusers builds four resampler layers
            p = f"image_proj.layers.{i}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                sd[p + norm + ".weight"], sd[p + norm + ".bias"] = 1 + rand(hidden), rand(hidden)
            sd[p + "0.to_q.weight"], sd[p + "0.to_kv.weight"] = rand(128, hidden), rand(256, hidden)
            sd[p + "0.to_out.weight"] = rand(hidden, 128)
            sd[p + "1.1.weight"], sd[p + "1.3.weight"] = rand(inner, hidden), rand(hidden, inner)
        sd["image_proj.proj_out.weight"], sd["image_proj.proj_out.bias"] = rand(width, hidden), rand(width)
        sd["image_proj.norm_out.weight"], sd["image_proj.norm_out.bias"] = 1 + rand(width), rand(width)
    else:
        sd["image_proj.proj.weight"], sd["image_proj.proj.bias"] = rand(4 * width, embed_dim), rand(4 * width)
        sd["image_proj.norm.weight"], sd["image_proj.norm.bias"] = 1 + rand(width), rand(width)
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            sd[f"ip_adapter.{index}.to_k_ip.weight"] = rand(attn.to_k.out_features, width)
            sd[f"ip_adapter.{index}.to_v_ip.weight"] = rand(attn.to_v.out_features, width)
    return sd


def image_encoder(hidden_size, projection_dim, image_size, seed):
    config = CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=8,
                              projection_dim=projection_dim)
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny SDXL folders written by diffusers (base, 9-channel inpainting, ControlNet) and the IP-Adapter folder."""
    root = tmp_path_factory.mktemp("ip-sdxl")
    base = tiny.diffusers_sdxl_components(root / "build", seed=0)
    base["unet"] = sdxl_unet(4, seed=10)
    diffusers.StableDiffusionXLPipeline(**base, add_watermarker=False).save_pretrained(root / "base")
    diffusers.StableDiffusionXLInpaintPipeline(**{**base, "unet": sdxl_unet(9, seed=20)},
                                               add_watermarker=False).save_pretrained(root / "inpaint")
    controlnet = tiny.diffusers_controlnet(base["unet"], seed=30)
    diffusers.StableDiffusionXLControlNetPipeline(**base, controlnet=controlnet,
                                                  add_watermarker=False).save_pretrained(root / "controlnet")

    ip = root / "IP-Adapter"
    (ip / "sdxl_models").mkdir(parents=True)
    unet = base["unet"]
    save_file(ip_weights(unet, 1, embed_dim=BIGG["projection_dim"]), str(ip / "sdxl_models" / PLAIN))
    save_file(ip_weights(unet, 2, embed_dim=VIT_H["projection_dim"]), str(ip / "sdxl_models" / PLAIN_VIT_H))
    save_file(ip_weights(unet, 3, plus_from=VIT_H["hidden_size"]), str(ip / "sdxl_models" / PLUS))
    image_encoder(**BIGG, seed=4).save_pretrained(ip / "sdxl_models" / "image_encoder")
    image_encoder(**VIT_H, seed=5).save_pretrained(ip / "models" / "image_encoder")
    return {"text2img": root / "base", "img2img": root / "base", "inpaint": root / "inpaint",
            "controlnet": root / "controlnet", "ip": ip}


CLASSES = {"text2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
           "inpaint": "StableDiffusionXLInpaintPipeline", "controlnet": "StableDiffusionXLControlNetPipeline"}


@pytest.fixture(scope="module")
def built(folders):
    """(diffloom, diffusers) pipelines of every kind, loaded from the same folders."""
    pipes = {}
    for kind, name in CLASSES.items():
        pair = (getattr(diffloom, name).from_pretrained(folders[kind]),
                getattr(diffusers, name).from_pretrained(folders[kind]))
        for pipe in pair:
            pipe.set_progress_bar_config(disable=True)
        pipes[kind] = pair
    return pipes


@pytest.fixture
def pipes(built, request):
    """The pair for the test's ``kind``; the IP-Adapters a test loads are unloaded afterwards."""
    ours, ref = built[request.param]
    yield request.param, ours, ref
    for pipe in (ours, ref):
        pipe.unload_ip_adapter()


@pytest.fixture(scope="module", autouse=True)
def parity_report():
    yield
    if PARITY:
        print("\nIP-Adapter SDXL parity (max abs difference to diffusers, float32):")
        for case, diff in PARITY.items():
            print(f"  {case:60s} {diff:.2e}")


def call_kwargs(kind: str) -> dict:
    kwargs = {"prompt": "a photo of the cat", "num_inference_steps": 3, "output_type": "np"}
    if kind == "img2img":
        return {**kwargs, "image": tiny.image(seed=5), "strength": 0.7, "num_inference_steps": 5}
    if kind == "inpaint":
        return {**kwargs, "image": tiny.image(seed=5), "mask_image": tiny.mask(), "strength": 0.9,
                "num_inference_steps": 5, "height": H, "width": W}
    if kind == "controlnet":
        return {**kwargs, "image": tiny.image(seed=7)}
    return {**kwargs, "height": H, "width": W}


def run(pipe, kind, **kwargs):
    return pipe(**{**call_kwargs(kind), "generator": torch.Generator().manual_seed(0), **kwargs}).images


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def compare(case, ours, ref, kind, **kwargs):
    a, b = run(ours, kind, **kwargs), run(ref, kind, **kwargs)
    diff = max_diff(a, b)
    PARITY[case] = max(diff, PARITY.get(case, 0.0))
    assert diff <= TOL, f"{case}: max abs difference {diff}"
    return a


def load(pipe, folders, weight_name, **kwargs):
    pipe.load_ip_adapter(folders["ip"], subfolder="sdxl_models", weight_name=weight_name, **kwargs)


every_kind = pytest.mark.parametrize("pipes", KINDS, indirect=True)


@pytest.mark.parametrize("name", [*CLASSES.values(), "StableDiffusionControlNetPipeline"])
def test_positional_argument_order(name):
    """ip_adapter_image and ip_adapter_image_embeds sit where diffusers has them (after the pooled embeddings)."""
    ref = [p for p in inspect.signature(getattr(diffusers, name).__call__).parameters if p != "kwargs"]
    # diffusers takes the deprecated callback/callback_steps through **kwargs; diffloom names them last.
    ours = [p for p in inspect.signature(getattr(diffloom, name).__call__).parameters
            if p not in ("hooks", "callback", "callback_steps")]
    assert ours == ref


@every_kind
@pytest.mark.parametrize("weight", ["plain", "plus"])
def test_scale_cutoff_and_unload(pipes, folders, weight):
    kind, ours, ref = pipes
    case = f"{kind} {weight}"
    before = run(ours, kind)
    image = tiny.image(seed=3)
    for pipe in (ours, ref):
        if weight == "plain":
            load(pipe, folders, PLAIN)
        else:
            load(pipe, folders, PLUS, image_encoder_folder="models/image_encoder")
    assert ours.image_encoder.config.image_size == (BIGG if weight == "plain" else VIT_H)["image_size"]
    a = compare(case, ours, ref, kind, ip_adapter_image=image)
    assert max_diff(a, before) > 1e-2  # the image prompt does steer
    for pipe in (ours, ref):
        pipe.set_ip_adapter_scale(0.5)
    a = compare(f"{case} scale 0.5", ours, ref, kind, ip_adapter_image=image)
    # The callback sets the scale to 0 from half-way on (and leaves it there): each pipeline starts at 0.5.
    outputs = []
    for pipe, callback in ((ours, IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.5)),
                           (ref, RefCutoff(cutoff_step_ratio=0.5))):
        pipe.set_ip_adapter_scale(0.5)
        outputs.append(run(pipe, kind, ip_adapter_image=image, callback_on_step_end=callback))
    PARITY[f"{case} scale cutoff callback"] = diff = max_diff(*outputs)
    assert diff <= TOL
    assert max_diff(outputs[0], a) > 1e-4  # the cutoff did change something

    ours.unload_ip_adapter()
    assert ours.unet.config.encoder_hid_dim_type is None and ours.image_encoder is None
    assert max_diff(run(ours, kind), before) == 0


@every_kind
def test_batches_and_guidance(pipes, folders):
    """Two prompts x two images each, guidance on (unconditional image embeddings first) and off, and the
    embeddings precomputed by diffusers giving the same images as the image they come from."""
    kind, ours, ref = pipes
    image = tiny.image(seed=4)
    for pipe in (ours, ref):
        load(pipe, folders, PLAIN)
    batch = {"prompt": ["a photo of the cat", "a red dog"], "num_images_per_prompt": 2}
    a = compare(f"{kind} 2 prompts x 2 images", ours, ref, kind, ip_adapter_image=image, **batch)
    assert a.shape[0] == 4
    embeds = ref.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, True)
    assert max_diff(run(ours, kind, ip_adapter_image_embeds=embeds, **batch), a) <= TOL
    compare(f"{kind} guidance off", ours, ref, kind, ip_adapter_image=image, guidance_scale=1.0)
    embeds = ref.prepare_ip_adapter_image_embeds(image, None, "cpu", 1, False)
    compare(f"{kind} guidance off, embeds", ours, ref, kind, ip_adapter_image_embeds=embeds, guidance_scale=1.0)


@pytest.mark.parametrize("pipes", ["img2img"], indirect=True)
def test_embeds_without_image_encoder(pipes, folders):
    """image_encoder_folder=None loads no encoder: precomputed embeddings still work, an image does not."""
    kind, ours, ref = pipes
    for pipe in (ours, ref):
        load(pipe, folders, PLAIN, image_encoder_folder=None)
    assert ours.image_encoder is None
    with torch.no_grad():
        pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
        embeds = image_encoder(**BIGG, seed=4)(pixels).image_embeds  # two reference images
    embeds = [torch.stack([torch.zeros_like(embeds), embeds])]  # (guidance halves, images, features)
    compare(f"{kind} embeds without an image encoder", ours, ref, kind, ip_adapter_image_embeds=embeds)
    with pytest.raises(ValueError, match="pass ip_adapter_image_embeds= instead"):
        run(ours, kind, ip_adapter_image=tiny.image())


@pytest.mark.parametrize("pipes", ["text2img", "controlnet"], indirect=True)
def test_two_adapters(pipes, folders):
    """A plain and a Plus adapter sharing the ViT-H encoder, per-adapter scales, InstantStyle's per-block
    scales, two reference images for one adapter, and precomputed embeddings."""
    kind, ours, ref = pipes
    first, second, third = tiny.image(seed=6), tiny.image(seed=7), tiny.image(seed=8)
    for pipe in (ours, ref):
        load(pipe, folders, [PLAIN_VIT_H, PLUS], image_encoder_folder="models/image_encoder")
        pipe.set_ip_adapter_scale([0.6, 0.9])
    compare(f"{kind} two adapters, scales [0.6, 0.9]", ours, ref, kind, ip_adapter_image=[first, second],
            num_images_per_prompt=2)
    style = [{"down": {"block_1": [0.0, 1.0]}}, {"up": {"block_0": [0.0, 1.0, 0.0]}}]
    for pipe in (ours, ref):
        pipe.set_ip_adapter_scale(style)
    images = [[first, third], second]  # two reference images for the first adapter
    a = compare(f"{kind} two adapters, per-block scales, 3 images", ours, ref, kind, ip_adapter_image=images)
    embeds = ref.prepare_ip_adapter_image_embeds(images, None, "cpu", 1, True)
    assert max_diff(run(ours, kind, ip_adapter_image_embeds=embeds), a) <= TOL


@pytest.mark.parametrize("pipes", ["controlnet"], indirect=True)
def test_controlnet_guess_mode(pipes, folders):
    """In guess mode the ControlNet sees the conditional half only; the UNet still gets both image halves."""
    kind, ours, ref = pipes
    for pipe in (ours, ref):
        load(pipe, folders, PLUS, image_encoder_folder="models/image_encoder")
    compare("controlnet plus, guess mode", ours, ref, kind, ip_adapter_image=tiny.image(seed=9), guess_mode=True)


@pytest.fixture(scope="module")
def sd_controlnet(tmp_path_factory):
    """The SD v1 ControlNet pipeline (it shares controlnet.py) and an SD-sized IP-Adapter for its UNet."""
    root = tmp_path_factory.mktemp("ip-sd-controlnet")
    path = tiny.save_sd_controlnet_folder(root / "pipe")
    pair = (diffloom.StableDiffusionControlNetPipeline.from_pretrained(path),
            diffusers.StableDiffusionControlNetPipeline.from_pretrained(path))
    ip = root / "IP-Adapter"
    (ip / "models").mkdir(parents=True)
    save_file(ip_weights(pair[1].unet, 6, embed_dim=VIT_H["projection_dim"]), str(ip / "models" / "ip.safetensors"))
    image_encoder(**VIT_H, seed=5).save_pretrained(ip / "models" / "image_encoder")
    for pipe in pair:
        pipe.set_progress_bar_config(disable=True)
        pipe.load_ip_adapter(ip, subfolder="models", weight_name="ip.safetensors")
    return pair


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sd_controlnet(sd_controlnet, guess_mode):
    ours, ref = sd_controlnet
    compare(f"SD controlnet plain, 2 prompts, guess_mode={guess_mode}", ours, ref, "controlnet",
            prompt=["a photo of the cat", "a red dog"], ip_adapter_image=tiny.image(seed=10), guess_mode=guess_mode)


@pytest.mark.parametrize("pipes", ["text2img"], indirect=True)
def test_errors(pipes, folders):
    kind, ours, _ = pipes
    image = tiny.image()
    with pytest.raises(ValueError, match="load_ip_adapter"):
        run(ours, kind, ip_adapter_image=image)
    load(ours, folders, PLAIN)
    with pytest.raises(ValueError, match="pass ip_adapter_image= or ip_adapter_image_embeds=.*unload_ip_adapter"):
        run(ours, kind)
    with pytest.raises(ValueError, match="ip_adapter_image or ip_adapter_image_embeds, not both"):
        run(ours, kind, ip_adapter_image=image, ip_adapter_image_embeds=[torch.zeros(2, 1, 20)])
    with pytest.raises(ValueError, match="ip_adapter_image has 2 entries for 1 IP-Adapters"):
        run(ours, kind, ip_adapter_image=[image, image])
    with pytest.raises(ValueError, match="list of 3-D or 4-D tensors"):
        run(ours, kind, ip_adapter_image_embeds=torch.zeros(2, 1, 20))
    with pytest.raises(ValueError, match="ip_adapter_image_embeds has 2 tensors for 1 IP-Adapters"):
        run(ours, kind, ip_adapter_image_embeds=[torch.zeros(2, 1, 20)] * 2)
    with pytest.raises(ValueError, match="unconditional embeddings over the conditional"):
        run(ours, kind, ip_adapter_image_embeds=[torch.zeros(1, 1, 20)])
    with pytest.raises(ValueError, match="2 scales for 1"):
        ours.set_ip_adapter_scale([0.5, 0.5])
    sd_sized = ip_weights(ours.unet, 0, embed_dim=20)
    sd_sized["ip_adapter.1.to_k_ip.weight"] = torch.zeros(16, 32)  # made for a narrower cross-attention
    with pytest.raises(ValueError, match="do not fit down_blocks.1.attentions.0.transformer_blocks.0.attn2"):
        ours.load_ip_adapter(sd_sized, subfolder=None, weight_name=None)
    del sd_sized["ip_adapter.1.to_k_ip.weight"]
    with pytest.raises(ValueError, match="lack ip_adapter.1.to_k_ip.weight"):
        ours.load_ip_adapter(sd_sized, subfolder=None, weight_name=None)
