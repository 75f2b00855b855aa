"""Seeded builders of tiny components, without network, shared by the test files.

Everything here is small enough to run a Stable Diffusion pipeline in a few milliseconds per step on a CPU:
a real ``transformers.CLIPTokenizer`` over a byte-level BPE vocabulary written to disk, a two-layer CLIP text
encoder, and diffusers UNets/VAEs a few channels wide. The pipeline folders are written with diffusers' own
classes (``save_*_folder``), so a test that loads them with diffloom checks that we read what diffusers writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Words that get their own token, so prompts tokenize to a realistic mix of merges and single bytes.
_MERGES = ["a t", "a n", "o n", "i n", "r e", "e r", "h e", "t h", "th e</w>", "a t</w>", "c at</w>", "d o", "do g</w>",
           "p h", "o t", "ph ot", "phot o</w>", "o f</w>", "an d</w>", "re d</w>", "i s</w>"]

TEXT_HIDDEN = 32
IMAGE_HEIGHT, IMAGE_WIDTH = 32, 48  # non-square on purpose


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    order = printable + extra
    by_byte = dict(zip(order, codes))
    return [chr(by_byte[b]) for b in range(256)]


def write_clip_vocab(folder) -> Path:
    """Write vocab.json and merges.txt of a tiny CLIP BPE into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def clip_text_encoder(tokenizer, seed=0, hidden_size=TEXT_HIDDEN):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def unet_config(in_channels=4, time_cond_proj_dim=None) -> dict:
    return dict(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
                attention_head_dim=2, norm_num_groups=4, time_cond_proj_dim=time_cond_proj_dim)


def vae_config() -> dict:
    # Four levels, so vae_scale_factor is 8 as in real Stable Diffusion.
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
                block_out_channels=(4, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4)


def unet2d_config() -> dict:
    return dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=4)


def scheduler_config() -> dict:
    """Stable Diffusion v1's PNDM scheduler settings."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)


def _perturbed(model, seed):
    """Diffusers initialises some layers (the UNet's last conv, attention outputs) small or at zero, which
    would hide mistakes in what flows through them; give every parameter a seeded random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def diffusers_sd_components(tmp, in_channels=4, time_cond_proj_dim=None, seed=0) -> dict:
    """The components of a tiny Stable Diffusion pipeline, built with diffusers' classes (no safety checker:
    tests that want one add :func:`diffusers_safety_checker`'s)."""
    import diffusers

    tokenizer = clip_tokenizer(Path(tmp) / "vocab")
    torch.manual_seed(seed)
    unet = _perturbed(diffusers.UNet2DConditionModel(**unet_config(in_channels, time_cond_proj_dim)), seed + 1)
    vae = _perturbed(diffusers.AutoencoderKL(**vae_config()), seed + 2)
    return dict(vae=vae, text_encoder=clip_text_encoder(tokenizer, seed + 3), tokenizer=tokenizer, unet=unet,
                scheduler=diffusers.PNDMScheduler(**scheduler_config()), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def diffusers_safety_checker(seed=0):
    """A tiny diffusers StableDiffusionSafetyChecker and its CLIPImageProcessor.

    Its concept thresholds are 2 (cosine similarity never exceeds 1), so nothing is flagged until a test
    calls :func:`arrange_to_flag`.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    try:  # without torchvision, transformers 5 serves CLIP image processing from this class
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, extractor


def arrange_to_flag(checker, extractor, images, flagged: list[bool]):
    """Set concept 0 of ``checker`` to the embedding of the first image meant to be flagged, with a threshold
    that only images in ``flagged`` exceed (numpy images in [0, 1], as a pipeline with output_type="np" returns).
    """
    import numpy as np
    import PIL.Image

    pils = [PIL.Image.fromarray((np.asarray(im) * 255).round().astype("uint8")) for im in images]
    with torch.no_grad():
        pixels = extractor(pils, return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        target = embeds[flagged.index(True)]
        cos = torch.nn.functional.cosine_similarity(embeds, target[None], dim=1)
        low = max(c for c, f in zip(cos.tolist(), flagged) if not f) if not all(flagged) else -1.0
        high = min(c for c, f in zip(cos.tolist(), flagged) if f)
        assert high - low > 0.01, "the images are too alike to flag some and not others"
        checker.concept_embeds[0] = target
        checker.concept_embeds_weights[0] = (low + high) / 2


def save_sd_folder(path, **kwargs) -> Path:
    """Save a tiny Stable Diffusion pipeline with diffusers; ``kwargs`` go to :func:`diffusers_sd_components`."""
    import diffusers

    path = Path(path)
    components = diffusers_sd_components(path.parent / (path.name + "-build"), **kwargs)
    pipe_class = diffusers.StableDiffusionInpaintPipeline if kwargs.get("in_channels") == 9 \
        else diffusers.StableDiffusionPipeline
    pipe_class(**components).save_pretrained(path)
    return path


def save_ddpm_folder(path, seed=0) -> Path:
    import diffusers

    torch.manual_seed(seed)
    unet = _perturbed(diffusers.UNet2DModel(**unet2d_config()), seed + 1)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return Path(path)


def image(height=IMAGE_HEIGHT, width=IMAGE_WIDTH, seed=0):
    """A seeded RGB PIL image with some structure (a gradient plus noise)."""
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1)
    pixels = np.clip(base * 200 + rng.normal(0, 20, base.shape), 0, 255).astype("uint8")
    return PIL.Image.fromarray(pixels)


def mask(height=IMAGE_HEIGHT, width=IMAGE_WIDTH, box=(8, 8, 24, 24)):
    """A white rectangle (x1, y1, x2, y2) to inpaint on black."""
    import PIL.Image
    import PIL.ImageDraw

    m = PIL.Image.new("L", (width, height), 0)
    PIL.ImageDraw.Draw(m).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=255)
    return m


# -- Stable Diffusion XL ----------------------------------------------------------------------------------------

ADDITION_TIME_EMBED_DIM = 8


def clip_text_encoder_with_projection(tokenizer, seed=0, hidden_size=TEXT_HIDDEN):
    """The second SDXL text encoder: CLIP with a projected pooled output (``text_embeds``)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return _perturbed(CLIPTextModelWithProjection(config), seed + 100)


def sdxl_unet_config(in_channels=4, refiner=False) -> dict:
    """A tiny SDXL UNet: "text_time" added embedding, context of both encoders (or, for the refiner, the
    second only) and five (refiner: aesthetic score) or six time ids."""
    context = TEXT_HIDDEN if refiner else 2 * TEXT_HIDDEN
    time_ids = 5 if refiner else 6
    return dict(unet_config(in_channels), cross_attention_dim=context, addition_embed_type="text_time",
                addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=time_ids * ADDITION_TIME_EMBED_DIM + TEXT_HIDDEN)


def euler_scheduler_config() -> dict:
    """SDXL's Euler scheduler settings."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon")


def diffusers_sdxl_components(tmp, in_channels=4, refiner=False, seed=0) -> dict:
    """The components of a tiny SDXL base (or, with ``refiner``, refiner) pipeline, built with diffusers."""
    import diffusers

    tokenizer = clip_tokenizer(Path(tmp) / "vocab")
    torch.manual_seed(seed)
    unet = _perturbed(diffusers.UNet2DConditionModel(**sdxl_unet_config(in_channels, refiner)), seed + 1)
    vae = _perturbed(diffusers.AutoencoderKL(**vae_config()), seed + 2)
    components = dict(vae=vae, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(**euler_scheduler_config()),
                      text_encoder_2=clip_text_encoder_with_projection(tokenizer, seed + 4), tokenizer_2=tokenizer)
    if refiner:
        components.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                          force_zeros_for_empty_prompt=False)
    else:
        components.update(text_encoder=_perturbed(clip_text_encoder(tokenizer, seed + 3), seed + 5),
                          tokenizer=tokenizer)
    return components


def save_sdxl_folder(path, in_channels=4, refiner=False, seed=0) -> Path:
    """Save a tiny SDXL pipeline with diffusers: text-to-image (base), img2img (refiner) or inpainting."""
    import diffusers

    path = Path(path)
    components = diffusers_sdxl_components(path.parent / (path.name + "-build"), in_channels, refiner, seed)
    if refiner:
        pipe_class = diffusers.StableDiffusionXLImg2ImgPipeline
    elif in_channels == 9:
        pipe_class = diffusers.StableDiffusionXLInpaintPipeline
    else:
        pipe_class = diffusers.StableDiffusionXLPipeline
    pipe_class(**components, add_watermarker=False).save_pretrained(path)
    return path


# -- ControlNet -------------------------------------------------------------------------------------------------


def diffusers_controlnet(unet, seed=0):
    """A tiny diffusers ControlNet copied from ``unet``'s encoder, then perturbed; its condition embedding
    downsamples 8x, like the VAE."""
    import diffusers

    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 4, 8, 8))
    return _perturbed(controlnet, seed + 10)


def save_sd_controlnet_folder(path, num_controlnets=1, seed=0) -> Path:
    """Save a tiny Stable Diffusion ControlNet pipeline with diffusers (one ControlNet or a list)."""
    import diffusers

    path = Path(path)
    components = diffusers_sd_components(path.parent / (path.name + "-build"), seed=seed)
    nets = [diffusers_controlnet(components["unet"], seed + 20 * k) for k in range(num_controlnets)]
    components["controlnet"] = nets[0] if num_controlnets == 1 else nets
    diffusers.StableDiffusionControlNetPipeline(**components).save_pretrained(path)
    return path


def save_sdxl_controlnet_folder(path, seed=0) -> Path:
    """Save a tiny SDXL ControlNet pipeline with diffusers."""
    import diffusers

    path = Path(path)
    components = diffusers_sdxl_components(path.parent / (path.name + "-build"), seed=seed)
    components["controlnet"] = diffusers_controlnet(components["unet"], seed)
    diffusers.StableDiffusionXLControlNetPipeline(**components, add_watermarker=False).save_pretrained(path)
    return path


# -- upscalers --------------------------------------------------------------------------------------------------


def save_x4_upscaler_folder(path, seed=0) -> Path:
    """Save a tiny x4 upscaler with diffusers: a 3-level VAE (4x), a UNet reading latents + the noised
    low-resolution image (7 channels) with the noise level as a class label."""
    import diffusers

    path = Path(path)
    tokenizer = clip_tokenizer(path.parent / (path.name + "-vocab"))
    torch.manual_seed(seed)
    unet = _perturbed(diffusers.UNet2DConditionModel(**dict(unet_config(in_channels=7), num_class_embeds=400)),
                      seed + 1)
    vae = _perturbed(diffusers.AutoencoderKL(**dict(vae_config(), block_out_channels=(4, 8, 8),
                                                    down_block_types=("DownEncoderBlock2D",) * 3,
                                                    up_block_types=("UpDecoderBlock2D",) * 3,
                                                    scaling_factor=0.08333)), seed + 2)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                        beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                        clip_sample=False, prediction_type="v_prediction")
    low_res_scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                beta_start=0.0001, beta_end=0.02)
    diffusers.StableDiffusionUpscalePipeline(vae=vae, text_encoder=clip_text_encoder(tokenizer, seed + 3),
                                             tokenizer=tokenizer, unet=unet, low_res_scheduler=low_res_scheduler,
                                             scheduler=scheduler, max_noise_level=350).save_pretrained(path)
    return path


def save_latent_upscaler_folder(path, seed=0) -> Path:
    """Save a tiny x2 latent upscaler with diffusers: the UNet reads latents + upsampled low-resolution latents
    (8 channels), predicts 4 + 1 channels, and takes the noise-level and pooled text embedding as
    ``timestep_cond`` (128 + the text width)."""
    import diffusers

    path = Path(path)
    tokenizer = clip_tokenizer(path.parent / (path.name + "-vocab"))
    torch.manual_seed(seed)
    config = dict(unet_config(in_channels=8, time_cond_proj_dim=128 + TEXT_HIDDEN), out_channels=5)
    unet = _perturbed(diffusers.UNet2DConditionModel(**config), seed + 1)
    vae = _perturbed(diffusers.AutoencoderKL(**vae_config()), seed + 2)
    scheduler = diffusers.EulerDiscreteScheduler(**euler_scheduler_config())
    diffusers.StableDiffusionLatentUpscalePipeline(vae=vae, text_encoder=clip_text_encoder(tokenizer, seed + 3),
                                                   tokenizer=tokenizer, unet=unet,
                                                   scheduler=scheduler).save_pretrained(path)
    return path


# -- depth-to-image ---------------------------------------------------------------------------------------------


def dpt_depth_estimator(seed=0):
    """A tiny transformers DPT (ViT backbone, 32x32 input) and its image processor."""
    from transformers import DPTConfig, DPTForDepthEstimation

    try:  # without torchvision, transformers 5 serves DPT image processing from this class
        from transformers import DPTImageProcessorPil as DPTImageProcessor
    except ImportError:
        from transformers import DPTImageProcessor

    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
                       image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, is_hybrid=False)
    torch.manual_seed(seed)
    estimator = _perturbed(DPTForDepthEstimation(config), seed + 1)
    return estimator, DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)


def save_depth2img_folder(path, seed=0) -> Path:
    """Save a tiny Stable Diffusion depth-to-image pipeline with diffusers (5-channel UNet, DPT estimator)."""
    import diffusers

    path = Path(path)
    components = diffusers_sd_components(path.parent / (path.name + "-build"), in_channels=5, seed=seed)
    estimator, processor = dpt_depth_estimator(seed + 30)
    diffusers.StableDiffusionDepth2ImgPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=components["scheduler"], depth_estimator=estimator,
        feature_extractor=processor).save_pretrained(path)
    return path
