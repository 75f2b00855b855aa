"""Single-file loading, case by case against diffusers' ``from_single_file``: every family, file variant, keyword
argument and refusal the sweep covered.

Files are written by this module's own converter (the inverse of the key mapping diffusers documents), and each
written file is first checked by diffusers reading it back exactly: neither library's writer is trusted.
Deliberate differences from diffusers are tested as such, each with the reason:
- scheduler rebuilt for prediction_type/scheduler_type: diffusers uses betas 0.02/0.085 when no original config is
  given (SD's are 0.00085/0.012); diffloom keeps SD's;
- load_safety_checker=False: diffusers loads the checker anyway; diffloom does not;
- image_size with config=: diffusers drops it unless original_config= is given; diffloom applies it.
"""

import re

import numpy as np
import pytest
import torch

import tiny

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_torch_thread")]

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}


@pytest.fixture(scope="module", autouse=True)
def hub_cache(tmp_path_factory):
    """No network and an empty Hub cache of our own, for diffloom and diffusers (which read the constants)."""
    import huggingface_hub.constants as constants

    cache = tmp_path_factory.mktemp("hub-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        yield cache


# -- the original layout, written independently (diffusers' documented mapping, inverted) ---------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
          "add_embedding.linear_2": "label_emb.0.2", "class_embedding": "label_emb", "conv_norm_out": "out.0",
          "conv_out": "out.2", "controlnet_mid_block": "middle_block_out.0",
          "controlnet_cond_embedding.conv_in": "input_hint_block.0",
          "controlnet_cond_embedding.conv_out": "input_hint_block.14"}


def _resnet(path):
    head, dot, tail = path.partition(".")
    return _RESNET.get(head, head) + dot + tail


def ldm_unet(model):
    """A diffusers UNet or ControlNet in LDM names: flat input/output blocks of layers_per_block (+1) entries."""
    per_level = model.config.layers_per_block + 1
    up_attends = ["CrossAttn" in t for t in getattr(model.config, "up_block_types", ())]
    out = {}
    for key, value in model.state_dict().items():
        name, _, param = key.rpartition(".")
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            index = int(m[2]) * per_level + int(m[4]) + (1 if m[1] == "down" else 0)
            blocks = "input_blocks" if m[1] == "down" else "output_blocks"
            target = f"{blocks}.{index}.0.{_resnet(m[5])}" if m[3] == "resnets" else f"{blocks}.{index}.1.{m[5]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name):
            target = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", name):
            target = f"output_blocks.{(int(m[1]) + 1) * per_level - 1}.{2 if up_attends[int(m[1])] else 1}.conv"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
            target = f"middle_block.{2 * int(m[2])}.{_resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
        elif m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", name):
            target = f"zero_convs.{m[1]}.0"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", name):
            target = f"input_hint_block.{2 * int(m[1]) + 2}"
        else:
            target = _FIXED[name]
        out[f"{target}.{param}"] = value
    return out


def ldm_vae(model):
    levels = len(model.config.up_block_types)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in model.state_dict().items():
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"(encoder|decoder)\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key):
            key = f"{m[1]}.down.{m[2]}." + (f"block.{m[4]}.{m[5]}" if m[3] == "resnets" else f"downsample.{m[5]}")
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key):
            level = levels - 1 - int(m[1])
            key = f"decoder.up.{level}." + (f"block.{m[3]}.{m[4]}" if m[2] == "resnets" else f"upsample.{m[4]}")
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            key = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            key = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            value = value[:, :, None, None] if m[3] == "weight" and m[2] != "group_norm" else value
        out[key] = value
    return out


def ldm_clip(model):
    return {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in model.state_dict().items() if "position_ids" not in k}


def ldm_openclip(model, extra_layer=False):
    """OpenCLIP names; ``extra_layer`` adds the last layer SD 2 files hold and its text encoder does not use."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6)}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = model.config.num_hidden_layers
    for i in range(layers + extra_layer):
        source, shift = min(i, layers - 1), max(i - layers + 1, 0)  # the extra layer: the last one, shifted
        for w in ("weight", "bias"):
            for ours, theirs in names.items():
                out[f"transformer.resblocks.{i}.{theirs}.{w}"] = sd[f"encoder.layers.{source}.{ours}.{w}"] + shift
            out[f"transformer.resblocks.{i}.attn.in_proj_{w}"] = torch.cat(
                [sd[f"encoder.layers.{source}.self_attn.{q}_proj.{w}"] for q in "qkv"]) + shift
    width = model.config.hidden_size
    out["text_projection"] = sd["text_projection.weight"].T if "text_projection.weight" in sd \
        else torch.eye(width)
    return out


def original_tensors(pipe):
    """A pipeline's components under the original prefixes (text encoders by the layout their family uses)."""
    out = {f"model.diffusion_model.{k}": v for k, v in ldm_unet(pipe.unet).items()}
    out.update({f"first_stage_model.{k}": v for k, v in ldm_vae(pipe.vae).items()})
    text, text_2 = pipe.components.get("text_encoder"), pipe.components.get("text_encoder_2")
    if text_2 is not None:
        prefix = "conditioner.embedders.1.model." if text is not None else "conditioner.embedders.0.model."
        out.update({prefix + k: v for k, v in ldm_openclip(text_2).items()})
        if text is not None:
            out.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in ldm_clip(text).items()})
    elif text.config.hidden_act == "gelu":  # SD 2's OpenCLIP
        out.update({f"cond_stage_model.model.{k}": v for k, v in ldm_openclip(text, extra_layer=True).items()})
    else:
        out.update({f"cond_stage_model.transformer.{k}": v for k, v in ldm_clip(text).items()})
    if pipe.components.get("controlnet") is not None:
        out.update({f"control_model.{k}": v for k, v in ldm_unet(pipe.controlnet).items()})
    return out


def save(tensors, path):
    from safetensors.torch import save_file

    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 10}, path)
    return path


# -- comparing ----------------------------------------------------------------------------------------------------

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet", "safety_checker")


def _settings(obj):
    """A model's or scheduler's config as diffusers' constructor reads it (init keys only, lists not tuples)."""
    from diffloom.configuration import init_keys

    keys = init_keys(type(obj))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in obj.config.items() if k in keys}


def assert_same_model(a, b, config=True):
    if a is None or b is None:
        assert a is None and b is None
        return
    sa, sb = a.state_dict(), b.state_dict()
    names = {k for k in sa if "position_ids" not in k}
    assert names == {k for k in sb if "position_ids" not in k}
    for k in names:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    if config and not hasattr(a.config, "to_dict"):
        assert _settings(a) == _settings(b)


def assert_same_pipeline(theirs, ours, scheduler_skip=()):
    assert type(theirs).__name__ == type(ours).__name__
    for name in MODELS:
        assert_same_model(theirs.components.get(name), ours.components.get(name))
    if "scheduler" in theirs.components:
        assert type(theirs.scheduler).__name__ == type(ours.scheduler).__name__
        a, b = _settings(theirs.scheduler), _settings(ours.scheduler)
        assert {k: v for k, v in a.items() if k not in scheduler_skip} == \
            {k: v for k, v in b.items() if k not in scheduler_skip}


def _run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    size = {} if "image" in kwargs else dict(height=tiny.IMAGE_HEIGHT, width=tiny.IMAGE_WIDTH)
    return pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", **size, **kwargs).images


# -- the families ---------------------------------------------------------------------------------------------

def _sd2_folder(path):
    """SD 2: OpenCLIP text tower (exact GELU), linear projections, per-level head counts, v-prediction DDIM."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    components = tiny.diffusers_sd_components(path.parent / "build-sd2", seed=3)
    config = CLIPTextConfig(**{**components["text_encoder"].config.to_dict(), "hidden_act": "gelu"})
    components["text_encoder"] = tiny._perturbed(CLIPTextModel(config), 4)
    torch.manual_seed(1)
    components["unet"] = tiny._perturbed(diffusers.UNet2DConditionModel(
        **dict(tiny.unet_config(), use_linear_projection=True, attention_head_dim=(2, 4))), 5)
    components["scheduler"] = diffusers.DDIMScheduler.from_config(
        dict(tiny.scheduler_config(), clip_sample=False, prediction_type="v_prediction"))
    diffusers.StableDiffusionPipeline(**components).save_pretrained(path)
    return path


def _sdxl_folder(path, refiner=False, in_channels=4):
    """Tiny SDXL whose two text encoders differ in width, as the real ones do (diffusers tells them apart so)."""
    import diffusers

    components = tiny.diffusers_sdxl_components(path.parent / "build-xl", in_channels, refiner, seed=7)
    width = 40
    components["text_encoder_2"] = tiny.clip_text_encoder_with_projection(components["tokenizer_2"], 8, width)
    config = dict(tiny.sdxl_unet_config(in_channels, refiner), use_linear_projection=True,
                  cross_attention_dim=width if refiner else tiny.TEXT_HIDDEN + width,
                  projection_class_embeddings_input_dim=(5 if refiner else 6) * tiny.ADDITION_TIME_EMBED_DIM + width)
    torch.manual_seed(9)
    components["unet"] = tiny._perturbed(diffusers.UNet2DConditionModel(**config), 10)
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else \
        diffusers.StableDiffusionXLInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionXLPipeline
    cls(**components, add_watermarker=False).save_pretrained(path)
    return path


FAMILIES = {  # name -> (folder builder, diffusers class name, call arguments)
    "sd1": (tiny.save_sd_folder, "StableDiffusionPipeline", {}),
    "sd1-inpaint": (lambda p: tiny.save_sd_folder(p, in_channels=9), "StableDiffusionInpaintPipeline",
                    dict(image=tiny.image(), mask_image=tiny.mask())),
    "sd2-v": (_sd2_folder, "StableDiffusionPipeline", {}),
    "sdxl-base": (_sdxl_folder, "StableDiffusionXLPipeline", {}),
    "sdxl-refiner": (lambda p: _sdxl_folder(p, refiner=True), "StableDiffusionXLImg2ImgPipeline",
                     dict(image=tiny.image(), strength=0.75)),
    "sdxl-inpaint": (lambda p: _sdxl_folder(p, in_channels=9), "StableDiffusionXLInpaintPipeline",
                     dict(image=tiny.image(), mask_image=tiny.mask())),
    "sd-controlnet": (tiny.save_sd_controlnet_folder, "StableDiffusionControlNetPipeline", dict(image=tiny.image())),
    "x4-upscaler": (tiny.save_x4_upscaler_folder, "StableDiffusionUpscalePipeline", None),
}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The SD 1 folder, its diffusers pipeline and its file, shared by the variant tests."""
    import diffusers

    folder = tiny.save_sd_folder(tmp_path_factory.mktemp("sd1") / "pipe")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    tensors = original_tensors(reference)
    return folder, reference, tensors, save(tensors, folder.parent / "sd1.safetensors")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_matches_diffusers(family, tmp_path):
    """The same file, config= a diffusers folder: the same weights, configs, scheduler and images."""
    import diffusers

    import diffloom

    build, class_name, call = FAMILIES[family]
    folder = build(tmp_path / family)
    reference = getattr(diffusers, class_name).from_pretrained(folder)
    path = save(original_tensors(reference), tmp_path / "model.safetensors")
    theirs = getattr(diffusers, class_name).from_single_file(str(path), config=str(folder))
    assert_same_pipeline(reference, theirs)
    ours = getattr(diffloom, class_name).from_single_file(path, config=folder)
    assert_same_pipeline(theirs, ours)
    assert type(diffloom.DiffusionPipeline.from_single_file(path, config=folder)).__name__ == class_name
    if call is not None:  # the pipelines' own parity (SDXL inpainting differs by 3e-6) is tested elsewhere
        np.testing.assert_allclose(_run(theirs, **call), _run(ours, **call), atol=1e-5)


VARIANTS = {  # name -> (change to the tensors, file suffix, keyword arguments for both libraries)
    "ckpt": (None, ".ckpt", {}),
    "fp16-file": (lambda t: {k: v.half() for k, v in t.items()}, ".safetensors", {}),
    "fp16-file-fp16-load": (lambda t: {k: v.half() for k, v in t.items()}, ".safetensors",
                            {"torch_dtype": torch.float16}),
    "dtype-alias": (None, ".safetensors", {"dtype": torch.bfloat16}),
    "ema-ignored": ("ema", ".safetensors", {}),
    "ema-extracted": ("ema", ".safetensors", {"extract_ema": True}),
    "training-leftovers": (lambda t: {**t, "denoiser.sigmas": torch.ones(3), "model_ema.decay": torch.tensor(0.9),
                                      "embedding_manager.embedder.x": torch.ones(1), "alphas_cumprod": torch.ones(3),
                                      "first_stage_model.loss.logvar": torch.ones(1)}, ".safetensors", {}),
}


def _with_ema(tensors):
    """LDM's EMA copy: each UNet weight, nudged, under its name with the dots removed."""
    generator = torch.Generator().manual_seed(5)
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + torch.randn(v.shape, generator=generator) / 100
           for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    return {**tensors, **ema, "model_ema.num_updates": torch.tensor(3)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_file_variants_match_diffusers(variant, sd1, tmp_path):
    import diffusers

    from diffloom import StableDiffusionPipeline

    folder, _, tensors, _ = sd1
    change, suffix, kwargs = VARIANTS[variant]
    tensors = _with_ema(tensors) if change == "ema" else change(tensors) if change else tensors
    path = save(tensors, tmp_path / f"model{suffix}")
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), **kwargs)
    ours = StableDiffusionPipeline.from_single_file(path, config=folder, allow_pickle=suffix == ".ckpt", **kwargs)
    assert_same_pipeline(theirs, ours)
    if variant == "ema-extracted":  # the EMA weights, not the training ones
        assert not torch.equal(ours.unet.conv_in.weight, sd1[1].unet.conv_in.weight)


def test_state_dict_and_flat_pickle(sd1, tmp_path):
    """A state dict in memory, and a pickle whose weights sit beside training counters (no "state_dict" level)."""
    import diffusers

    from diffloom import StableDiffusionPipeline, UNet2DConditionModel

    folder, reference, tensors, _ = sd1
    assert_same_model(diffusers.UNet2DConditionModel.from_single_file(tensors, config=str(folder), subfolder="unet"),
                      UNet2DConditionModel.from_single_file(tensors, config=folder, subfolder="unet"))
    torch.save({**tensors, "global_step": 5, "epoch": 1}, tmp_path / "flat.ckpt")
    pipe = StableDiffusionPipeline.from_single_file(tmp_path / "flat.ckpt", config=folder, allow_pickle=True)
    assert_same_pipeline(reference, pipe)


# -- the keyword arguments ----------------------------------------------------------------------------------------

SETTINGS = {
    "prediction_type": {"prediction_type": "v_prediction"},
    "scheduler_type-ddim": {"scheduler_type": "ddim"},
    "scheduler_type-euler-ancestral": {"scheduler_type": "euler-ancestral", "prediction_type": "epsilon"},
    "scheduler_type-dpm": {"scheduler_type": "dpm"},
    "scheduler_type-lms": {"scheduler_type": "lms"},
    "scheduler_type-heun": {"scheduler_type": "heun"},
    "scheduler_type-pndm": {"scheduler_type": "pndm"},
    "num_in_channels": {"num_in_channels": 4},
    "upcast_attention": {"upcast_attention": True},
    "scaling_factor": {"scaling_factor": 0.5},
    "text_encoder=None": {"text_encoder": None},
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_match_diffusers(name, sd1):
    import diffusers

    from diffloom import StableDiffusionPipeline

    folder, _, _, path = sd1
    kwargs = SETTINGS[name]
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), **kwargs)
    ours = StableDiffusionPipeline.from_single_file(path, config=folder, **kwargs)
    rebuilt = "prediction_type" in kwargs or "scheduler_type" in kwargs
    # Without an original config, diffusers rebuilds with betas 0.02..0.085, a typo for SD's 0.00085..0.012.
    assert_same_pipeline(theirs, ours, scheduler_skip=SD_BETAS if rebuilt else ())
    assert {k: ours.scheduler.config[k] for k in SD_BETAS} == SD_BETAS


def test_components_given_or_missing(sd1, tmp_path):
    """A file without VAE or text encoder: both libraries refuse (diffloom names the file, the keys and the fix),
    and both take the component when it is passed."""
    import diffusers

    from diffloom import AutoencoderKL, StableDiffusionPipeline

    folder, reference, tensors, _ = sd1
    for name, prefix in (("vae", "first_stage_model."), ("text_encoder", "cond_stage_model.transformer.")):
        path = save({k: v for k, v in tensors.items() if not k.startswith(prefix)}, tmp_path / f"no-{name}.safetensors")
        with pytest.raises(Exception, match="missing in the checkpoint"):
            diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder))
        with pytest.raises(ValueError, match=rf"no-{name}\.safetensors holds no {name} weights \(keys under "
                                             rf"{re.escape(prefix)}\).*pass {name}="):
            StableDiffusionPipeline.from_single_file(path, config=folder)
        given = {"vae": AutoencoderKL.from_pretrained(folder, subfolder="vae")} if name == "vae" \
            else {"text_encoder": reference.text_encoder}
        theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
                                                                    **{name: getattr(reference, name)})
        assert_same_pipeline(theirs, StableDiffusionPipeline.from_single_file(path, config=folder, **given))
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction")
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(sd1[3]), config=str(folder), scheduler=scheduler)
    assert_same_pipeline(theirs, StableDiffusionPipeline.from_single_file(sd1[3], config=folder, scheduler=scheduler))


def test_image_size_sets_sample_sizes(sd1):
    """diffusers applies image_size only with original_config=; diffloom applies it always, the same way (the
    VAE's sample_size is the image size, the UNet's that size in latent pixels)."""
    from diffloom import StableDiffusionPipeline

    folder, _, _, path = sd1
    pipe = StableDiffusionPipeline.from_single_file(path, config=folder, image_size=256)
    assert (pipe.vae.config.sample_size, pipe.unet.config.sample_size) == (256, 256 // 8)


def _fake_safety_checker_repo(cache):
    """The safety checker repo diffusers' load_safety_checker fetches, as the Hub cache would hold it."""
    repo = cache / "models--CompVis--stable-diffusion-safety-checker"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    checker, extractor = tiny.diffusers_safety_checker(seed=1)
    checker.save_pretrained(repo / "snapshots" / revision)
    extractor.save_pretrained(repo / "snapshots" / revision)


def test_load_safety_checker(sd1, hub_cache):
    import diffusers

    from diffloom import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffloom.hub import LoadError

    folder, _, _, path = sd1
    with pytest.raises(LoadError, match="CompVis/stable-diffusion-safety-checker"):
        StableDiffusionPipeline.from_single_file(path, config=folder, load_safety_checker=True)
    _fake_safety_checker_repo(hub_cache)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder),
                                                                load_safety_checker=True)
    ours = StableDiffusionPipeline.from_single_file(path, config=folder, load_safety_checker=True)
    assert_same_pipeline(theirs, ours)
    assert ours.feature_extractor.to_dict() == theirs.feature_extractor.to_dict()
    np.testing.assert_array_equal(_run(theirs), _run(ours))
    # diffusers loads the checker for load_safety_checker=False too; False means none here.
    assert StableDiffusionPipeline.from_single_file(path, config=folder, load_safety_checker=False).safety_checker \
        is None
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline has no safety checker"):
        StableDiffusionXLPipeline.from_single_file(path, config=folder, load_safety_checker=True)


# -- model classes ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_files(sd1, tmp_path_factory):
    """Files of one model: the whole pipeline file, and single models with their keys at the top level, under
    "vae." or in diffusers' own names."""
    folder, reference, tensors, path = sd1
    tmp = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    controlnet = tiny.diffusers_controlnet(reference.unet)
    controlnet.save_pretrained(tmp / "controlnet")
    control = ldm_unet(controlnet)
    files = {"pipeline": path, "vae-top": save(ldm_vae(reference.vae), tmp / "vae.safetensors"),
             "vae-prefix": save({f"vae.{k}": v for k, v in ldm_vae(reference.vae).items()}, tmp / "vae2.safetensors"),
             "vae-diffusers": save(reference.vae.state_dict(), tmp / "vae3.safetensors"),
             "unet-diffusers": save(reference.unet.state_dict(), tmp / "unet.safetensors"),
             "ema": save(_with_ema(tensors), tmp / "ema.safetensors"),
             "fp16": save({k: v.half() for k, v in tensors.items()}, tmp / "fp16.safetensors"),
             "control-prefix": save({f"control_model.{k}": v for k, v in control.items()}, tmp / "c1.safetensors"),
             "control-top": save(control, tmp / "c2.safetensors"),
             "control-diffusers": save(controlnet.state_dict(), tmp / "c3.safetensors")}
    return folder, tmp / "controlnet", files


MODEL_CASES = [  # (class, file, subfolder, keyword arguments)
    ("UNet2DConditionModel", "pipeline", "unet", {}),
    ("UNet2DConditionModel", "unet-diffusers", "unet", {}),
    ("UNet2DConditionModel", "ema", "unet", {"extract_ema": True}),
    ("UNet2DConditionModel", "fp16", "unet", {}),
    ("UNet2DConditionModel", "fp16", "unet", {"torch_dtype": torch.float16}),
    ("UNet2DConditionModel", "pipeline", "unet", {"dtype": torch.bfloat16}),
    ("UNet2DConditionModel", "pipeline", "unet", {"num_in_channels": 4, "upcast_attention": True,
                                                  "sample_size": 12}),
    ("AutoencoderKL", "pipeline", "vae", {}),
    ("AutoencoderKL", "vae-top", "vae", {}),
    ("AutoencoderKL", "vae-prefix", "vae", {}),
    ("AutoencoderKL", "vae-diffusers", "vae", {"scaling_factor": 0.5}),
    ("ControlNetModel", "control-prefix", None, {}),
    ("ControlNetModel", "control-top", None, {"torch_dtype": torch.float16}),
    ("ControlNetModel", "control-diffusers", None, {}),
]


@pytest.mark.parametrize("class_name,file,subfolder,kwargs", MODEL_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(c[3]) or 'plain'}" for c in MODEL_CASES])
def test_model_classes_match_diffusers(class_name, file, subfolder, kwargs, model_files):
    import diffusers

    import diffloom

    folder, controlnet_folder, files = model_files
    config = controlnet_folder if class_name == "ControlNetModel" else folder
    theirs = getattr(diffusers, class_name).from_single_file(str(files[file]), config=str(config),
                                                             subfolder=subfolder, **kwargs)
    ours = getattr(diffloom, class_name).from_single_file(files[file], config=config, subfolder=subfolder, **kwargs)
    assert_same_model(theirs, ours)


# -- original training configs ------------------------------------------------------------------------------------

def _training_config(controlnet=False):
    """A small LDM training config: 32-wide levels (LDM's group norms need 32 channels), v-prediction."""
    net = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
           "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "transformer_depth": 1,
           "context_dim": tiny.TEXT_HIDDEN}
    params = {"parameterization": "v", "scale_factor": 0.5, "linear_start": 0.001, "linear_end": 0.02,
              "timesteps": 1000, "unet_config": {"params": net},
              "first_stage_config": {"params": {"ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32,
                                                             "ch_mult": [1, 2], "num_res_blocks": 1}}}}
    if controlnet:
        params["control_stage_config"] = {"params": {**net, "hint_channels": 3}}
    return {"model": {"params": params}}


@pytest.fixture(scope="module")
def original_file(sd1, tmp_path_factory):
    import diffusers
    import yaml

    reference = sd1[1]
    tmp = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    unet = tiny._perturbed(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=tiny.TEXT_HIDDEN, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        1)
    vae = tiny._perturbed(diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                                  up_block_types=("UpDecoderBlock2D",) * 2), 2)
    tensors = {f"model.diffusion_model.{k}": v for k, v in ldm_unet(unet).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in ldm_vae(vae).items()})
    tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in ldm_clip(reference.text_encoder).items()})
    (tmp / "model.yaml").write_text(yaml.safe_dump(_training_config()))
    return save(tensors, tmp / "model.safetensors"), tmp / "model.yaml", unet


ORIGINAL_CASES = [("UNet2DConditionModel", {}), ("UNet2DConditionModel", {"image_size": 256}),
                  ("UNet2DConditionModel", {"upcast_attention": True, "num_in_channels": 4}),
                  ("AutoencoderKL", {}), ("AutoencoderKL", {"image_size": 128, "scaling_factor": 0.3})]


@pytest.mark.parametrize("as_dict", [False, True], ids=["yaml-file", "dict"])
@pytest.mark.parametrize("class_name,kwargs", ORIGINAL_CASES, ids=[f"{c}-{'-'.join(k) or 'plain'}"
                                                                   for c, k in ORIGINAL_CASES])
def test_original_config_models_match_diffusers(class_name, kwargs, as_dict, original_file):
    """The config a training .yaml gives, sample sizes included (the family's resolution in latent pixels)."""
    import diffusers

    import diffloom

    path, yaml_path, _ = original_file
    original = _training_config() if as_dict else yaml_path
    theirs = getattr(diffusers, class_name).from_single_file(str(path), original_config=original if as_dict
                                                             else str(yaml_path), **kwargs)
    assert_same_model(theirs, getattr(diffloom, class_name).from_single_file(path, original_config=original,
                                                                             **kwargs))


def test_pipeline_original_config_matches_diffusers_models(sd1, original_file):
    """diffusers' offline original_config path: the UNet and VAE as the .yaml gives them."""
    import diffusers

    from diffloom import StableDiffusionPipeline

    reference = sd1[1]
    path, yaml_path, _ = original_file
    common = dict(tokenizer=reference.tokenizer, text_encoder=reference.text_encoder)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), original_config=str(yaml_path),
                                                                local_files_only=True, safety_checker=None, **common)
    ours = StableDiffusionPipeline.from_single_file(path, original_config=yaml_path, **common)
    for name in ("unet", "vae", "text_encoder"):
        assert_same_model(getattr(theirs, name), getattr(ours, name))
    assert {k: ours.scheduler.config[k] for k in ("beta_start", "beta_end")} == {"beta_start": 0.001,
                                                                                 "beta_end": 0.02}


def test_controlnet_training_config(original_file, tmp_path):
    """A ControlNet from its cldm .yaml (control_stage_config); diffusers 0.42 fails on these with a TypeError,
    so the reference is the ControlNet the file was written from."""
    import diffusers

    from diffloom import ControlNetModel

    _, _, unet = original_file
    reference = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    path = save({f"control_model.{k}": v for k, v in ldm_unet(reference).items()}, tmp_path / "c.safetensors")
    ours = ControlNetModel.from_single_file(path, original_config=_training_config(controlnet=True))
    assert_same_model(reference, ours, config=False)
    assert {k: v for k, v in _settings(ours).items() if k in _settings(reference)} == _settings(reference)
    with pytest.raises(ValueError, match="control_stage_config"):
        ControlNetModel.from_single_file(path, original_config=_training_config())


@pytest.mark.parametrize("net", [
    {"num_classes": "sequential", "adm_in_channels": 1536, "context_dim": 1024},  # SD 2 unCLIP: projected class
    {"num_classes": "sequential", "adm_in_channels": 2816, "context_dim": 2048},  # SDXL: size/crop conditioning
    {"num_classes": 1000, "context_dim": 1024, "disable_self_attentions": [True, False]},  # upscaler table
    {"use_linear_in_transformer": True, "num_head_channels": 16, "context_dim": 1024, "transformer_depth": [1, 2]},
], ids=["unclip", "sdxl", "class-table", "head-width"])
def test_original_config_mapping_matches_diffusers(net):
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from diffloom_single_file import original_config

    config = _training_config()
    params = config["model"]["params"]["unet_config"]["params"]
    params.update(net)
    if "num_head_channels" in net:
        del params["num_heads"]
    theirs = create_unet_diffusers_config_from_ldm(config, {})
    ours = original_config.unet(config, image_size=512)
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.items()} == ours


# -- ControlNet pipelines and full ControlNet training files ------------------------------------------------------

def test_controlnet_training_file_in_pipelines(tmp_path):
    """A ControlNet training checkpoint holds the whole SD model beside control_model.*: a ControlNet pipeline
    reads both, a plain SD pipeline the SD part (as diffusers does)."""
    import diffusers

    from diffloom import StableDiffusionControlNetPipeline, StableDiffusionPipeline

    folder = tiny.save_sd_controlnet_folder(tmp_path / "cn")
    reference = diffusers.StableDiffusionControlNetPipeline.from_pretrained(folder)
    path = save(original_tensors(reference), tmp_path / "cldm.safetensors")
    theirs = diffusers.StableDiffusionControlNetPipeline.from_single_file(str(path), config=str(folder))
    assert_same_pipeline(reference, theirs)
    assert_same_pipeline(theirs, StableDiffusionControlNetPipeline.from_single_file(path, config=folder))
    sd = StableDiffusionPipeline.from_single_file(path, config=folder)
    assert_same_model(reference.unet, sd.unet)


# -- writing, and choosing the pipeline ---------------------------------------------------------------------------

@pytest.mark.parametrize("family,dtype", [("x4-upscaler", None), ("sd1", torch.float16)])
def test_save_single_file_reads_back_in_diffusers(family, dtype, tmp_path):
    """The upscaler's class-label table (label_emb) and an fp16 pipeline survive save_single_file."""
    import diffusers

    import diffloom

    build, class_name, _ = FAMILIES[family]
    folder = build(tmp_path / family)
    ours = getattr(diffloom, class_name).from_pretrained(folder, torch_dtype=dtype)
    path = ours.save_single_file(tmp_path / "model.safetensors")
    theirs = getattr(diffusers, class_name).from_single_file(str(path), config=str(folder), torch_dtype=dtype)
    assert_same_pipeline(theirs, ours)


@pytest.mark.parametrize("channels,pipeline", [(8, "StableDiffusionInstructPix2PixPipeline"),
                                               (5, "StableDiffusionDepth2ImgPipeline"),
                                               (7, "StableDiffusionUpscalePipeline"),
                                               (6, "config=")])
def test_task_files_name_their_pipeline(channels, pipeline, sd1, tmp_path):
    from diffloom import DiffusionPipeline

    tensors = dict(sd1[2])
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, channels, 3, 3)
    path = save(tensors, tmp_path / "task.safetensors")
    with pytest.raises(ValueError, match=rf"reads {channels} input channels.*{re.escape(pipeline)}"):
        DiffusionPipeline.from_single_file(path)


def test_instruct_pix2pix_unet(tmp_path):
    """diffloom has no instruct-pix2pix pipeline; the 8-channel UNet loads as diffusers loads it."""
    import diffusers

    from diffloom import UNet2DConditionModel

    components = tiny.diffusers_sd_components(tmp_path / "build", in_channels=8)
    folder = tmp_path / "ip2p"
    diffusers.StableDiffusionInstructPix2PixPipeline(**components).save_pretrained(folder)
    reference = diffusers.StableDiffusionInstructPix2PixPipeline.from_pretrained(folder)
    path = save(original_tensors(reference), tmp_path / "ip2p.safetensors")
    theirs = diffusers.StableDiffusionInstructPix2PixPipeline.from_single_file(str(path), config=str(folder))
    assert_same_model(reference.unet, theirs.unet)
    assert_same_model(theirs.unet, UNet2DConditionModel.from_single_file(path, config=folder))


# -- refusals -----------------------------------------------------------------------------------------------------

def test_refusals_name_the_fix(sd1, tmp_path):
    """Where diffusers raises, diffloom raises too, naming the file, key or argument and what would fix it."""
    import diffusers

    from diffloom import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffloom.modeling import WeightsError

    folder, _, tensors, path = sd1
    sd = StableDiffusionPipeline.from_single_file
    both = [  # (diffusers call, diffloom call, diffloom's message)
        (lambda: diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), num_in_channels=9),
         lambda: sd(path, config=folder, num_in_channels=9), r"conv_in\.weight has shape \(8, 4, 3, 3\) but the config "
                                                             r"builds \(8, 9, 3, 3\)"),
        (lambda: diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), scheduler_type="x"),
         lambda: sd(path, config=folder, scheduler_type="x"), r"scheduler_type='x' is not one of \['ddim', 'dpm'"),
        (lambda: diffusers.UNet2DConditionModel.from_single_file(str(path), config=str(folder), original_config={}),
         lambda: UNet2DConditionModel.from_single_file(path, config=folder, original_config={}), "not both"),
    ]
    # LCM's guidance embedding (time_cond_proj_dim) has no original name: diffusers fails on a meta tensor.
    lcm = tmp_path / "lcm"
    diffusers.StableDiffusionPipeline(**tiny.diffusers_sd_components(tmp_path / "b", time_cond_proj_dim=8)) \
        .save_pretrained(lcm)
    both.append((lambda: diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(lcm)),
                 lambda: sd(path, config=lcm), r"sd1\.safetensors.*time_cond_proj_dim.*from_pretrained"))
    for theirs, ours, message in both:
        with pytest.raises(Exception):
            theirs()
        with pytest.raises((ValueError, WeightsError), match=message):
            ours()
    ours_only = [
        (lambda: sd(path, config=folder, scheduler_type="ddim", scheduler=None), "scheduler= .* or scheduler_type="),
        (lambda: UNet2DConditionModel.from_single_file(path, config=folder, prediction_type="epsilon"),
         r"does not take \['prediction_type'\], which sets another component: pass it to a pipeline's"),
        (lambda: AutoencoderKL.from_single_file(path, config=folder, bogus=1), r"unexpected arguments \['bogus'\]"),
        (lambda: UNet2DConditionModel.from_single_file(save({k: v for k, v in _with_ema(tensors).items()
                                                             if "input_blocks00" not in k}, tmp_path / "e.safetensors"),
                                                        config=folder, extract_ema=True),
         r"e\.safetensors \(unet\): extract_ema=True, but its EMA weights lack the UNet's input_blocks\.0\.0\."),
        (lambda: sd(path, original_config="https://example.com/v1-inference.yaml"), "configs are not downloaded"),
        (lambda: UNet2DConditionModel.from_single_file(path, config=folder, subfolder="nope"),
         r"no config\.json for a UNet2DConditionModel \(looked in .*/nope\)"),
    ]
    for call, message in ours_only:
        with pytest.raises((ValueError, TypeError), match=message):
            call()
