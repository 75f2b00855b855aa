"""Single-file checkpoints: our writer, our reader, diffusers' reader, family detection, the convert command."""


import numpy as np
import pytest
import torch

import tiny

pytestmark = pytest.mark.filterwarnings("ignore")

FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hub cache, for diffloom and for diffusers (which reads the constant)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _max_diff(a, b, names=FILE_COMPONENTS):
    """Largest difference over the weights of the named components (which must have the same keys)."""
    worst = 0.0
    for name in names:
        x, y = a.components.get(name), b.components.get(name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        sx, sy = x.state_dict(), y.state_dict()
        assert set(sx) == set(sy), f"{name}: {sorted(set(sx) ^ set(sy))[:5]}"
        worst = max([worst] + [(sx[k].float() - sy[k].float()).abs().max().item() for k in sx])
    return worst


def _images(pipe, **kwargs):
    return pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                height=tiny.IMAGE_HEIGHT, width=tiny.IMAGE_WIDTH, output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def sd_file(tiny_sd_path, tmp_path_factory):
    from diffloom import StableDiffusionPipeline

    path = tmp_path_factory.mktemp("single") / "sd.safetensors"
    StableDiffusionPipeline.from_pretrained(tiny_sd_path).save_single_file(path)
    return path


# -- round trips ------------------------------------------------------------------------------------------------

def test_round_trip_same_weights_and_images(tiny_sd_path, sd_file, offline):
    from diffloom import StableDiffusionPipeline

    folder = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    single = StableDiffusionPipeline.from_single_file(sd_file, config=tiny_sd_path)
    assert _max_diff(folder, single) == 0.0
    assert type(single.scheduler).__name__ == "PNDMScheduler"
    assert single.tokenizer("a cat").input_ids == folder.tokenizer("a cat").input_ids
    np.testing.assert_array_equal(_images(folder), _images(single))


def test_written_layout_is_the_original_one(sd_file):
    from safetensors import safe_open

    keys = set(safe_open(str(sd_file), "pt").keys())
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.0.weight",
                "model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.out.2.bias",
                "model.diffusion_model.output_blocks.1.1.conv.weight",  # the upsampler of the lowest level
                "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.decoder.up.0.block.0.conv1.bias",
                "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        assert key in keys
    with safe_open(str(sd_file), "pt") as f:
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[2:] == [1, 1]


def test_diffusers_reads_our_file_like_we_do(tiny_sd_path, sd_file, offline):
    import diffusers

    from diffloom import StableDiffusionPipeline

    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(sd_file), config=str(tiny_sd_path),
                                                                safety_checker=None)
    ours = StableDiffusionPipeline.from_single_file(sd_file, config=tiny_sd_path)
    assert _max_diff(theirs, ours) <= 1e-5
    theirs.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_images(theirs), _images(ours), atol=1e-4)


def test_sd2_openclip_text_encoder(tmp_path, offline):
    """SD 2's text encoder is OpenCLIP (fused q/k/v, exact GELU); diffusers must read our file the same way."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffloom import StableDiffusionPipeline

    components = tiny.diffusers_sd_components(tmp_path / "build", seed=3)
    config = CLIPTextConfig(**{**components["text_encoder"].config.to_dict(), "hidden_act": "gelu"})
    torch.manual_seed(4)
    components["text_encoder"] = CLIPTextModel(config).eval()
    folder = tmp_path / "sd2"
    diffusers.StableDiffusionPipeline(**components).save_pretrained(folder)
    path = tmp_path / "sd2.safetensors"
    StableDiffusionPipeline.from_pretrained(folder).save_single_file(path)

    from safetensors import safe_open

    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in safe_open(str(path), "pt").keys()
    ours = StableDiffusionPipeline.from_single_file(path, config=folder)
    assert _max_diff(StableDiffusionPipeline.from_pretrained(folder), ours) == 0.0
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), safety_checker=None)
    assert _max_diff(theirs, ours) <= 1e-5


def test_inpainting_file_picks_the_inpaint_pipeline(tiny_sd_inpaint_path, tmp_path, offline):
    from diffloom import DiffusionPipeline, StableDiffusionInpaintPipeline

    path = tmp_path / "inpaint.safetensors"
    DiffusionPipeline.from_pretrained(tiny_sd_inpaint_path).save_single_file(path)
    pipe = DiffusionPipeline.from_single_file(path, config=tiny_sd_inpaint_path)
    assert type(pipe) is StableDiffusionInpaintPipeline and pipe.unet.config.in_channels == 9
    assert _max_diff(StableDiffusionInpaintPipeline.from_pretrained(tiny_sd_inpaint_path), pipe) == 0.0


def _sdxl_folder(tmp_path, refiner):
    """A tiny SDXL folder whose two text encoders differ in width, as the real ones do (768 and 1280): diffusers
    tells them apart by width, so equal widths would make it read the wrong one."""
    import diffusers

    components = tiny.diffusers_sdxl_components(tmp_path / "build", refiner=refiner, seed=7)
    width = 40
    components["text_encoder_2"] = tiny.clip_text_encoder_with_projection(components["tokenizer_2"], seed=8,
                                                                          hidden_size=width)
    context = width if refiner else tiny.TEXT_HIDDEN + width
    time_ids = 5 if refiner else 6
    config = dict(tiny.sdxl_unet_config(refiner=refiner), cross_attention_dim=context,
                  projection_class_embeddings_input_dim=time_ids * tiny.ADDITION_TIME_EMBED_DIM + width)
    torch.manual_seed(9)
    components["unet"] = tiny._perturbed(diffusers.UNet2DConditionModel(**config), 10)
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if refiner else diffusers.StableDiffusionXLPipeline
    folder = tmp_path / ("refiner" if refiner else "base")
    cls(**components, add_watermarker=False).save_pretrained(folder)
    return folder, cls


@pytest.mark.parametrize("refiner", [False, True], ids=["base", "refiner"])
def test_sdxl_round_trip_and_diffusers(tmp_path, offline, refiner):
    from safetensors import safe_open

    from diffloom import DiffusionPipeline

    folder, diffusers_class = _sdxl_folder(tmp_path, refiner)
    original = DiffusionPipeline.from_pretrained(folder)
    path = tmp_path / "xl.safetensors"
    original.save_single_file(path)
    keys = set(safe_open(str(path), "pt").keys())
    expected = "conditioner.embedders.0.model.text_projection" if refiner else \
        "conditioner.embedders.1.model.text_projection"
    assert expected in keys and "model.diffusion_model.label_emb.0.0.weight" in keys

    ours = DiffusionPipeline.from_single_file(path, config=folder)
    assert type(ours).__name__ == type(original).__name__
    assert _max_diff(original, ours) == 0.0
    assert ours.config.get("requires_aesthetics_score", False) == refiner
    theirs = diffusers_class.from_single_file(str(path), config=str(folder))
    assert _max_diff(theirs, ours) <= 1e-5


def test_model_classes(tiny_sd_path, sd_file, offline):
    from diffloom import AutoencoderKL, UNet2DConditionModel

    for cls, name in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae")):
        from_file = cls.from_single_file(sd_file, config=tiny_sd_path, torch_dtype=torch.float16)
        reference = cls.from_pretrained(tiny_sd_path, subfolder=name)
        assert from_file.dtype == torch.float16
        for key, value in reference.state_dict().items():
            assert torch.equal(from_file.state_dict()[key], value.half()), key


def test_controlnet_file(tmp_path, offline):
    import diffusers
    from safetensors.torch import save_file

    from diffloom import ControlNetModel
    from diffloom_single_file import keys

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**tiny.unet_config())
    folder = tmp_path / "controlnet"
    tiny.diffusers_controlnet(unet).save_pretrained(folder)
    reference = ControlNetModel.from_pretrained(folder)
    original = keys.model_to_original("controlnet", reference.state_dict())
    # Seven convs with a SiLU after all but the last: Sequential positions 0, 2, ..., 14.
    assert torch.equal(original["input_hint_block.14.weight"],
                       reference.state_dict()["controlnet_cond_embedding.conv_out.weight"])
    assert {"input_hint_block.0.weight", "input_hint_block.12.weight", "zero_convs.0.0.weight",
            "middle_block_out.0.weight"} <= set(original)
    path = tmp_path / "control.safetensors"
    save_file({f"control_model.{k}": v.contiguous() for k, v in original.items()}, str(path))
    ours = ControlNetModel.from_single_file(path, config=folder)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in reference.state_dict().items())
    theirs = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder))
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in reference.state_dict().items())


# -- full-size layouts, built on the meta device -------------------------------------------------------------------

def _full_size_keys(family_name, in_channels=4) -> dict:
    """{key: shape} of a full-size checkpoint of a family, as save_single_file would write it."""
    import transformers
    from transformers import CLIPTextConfig

    from diffloom import AutoencoderKL, UNet2DConditionModel
    from diffloom_single_file import families, keys

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**families.UNET[family_name], "in_channels": in_channels})
        vae = AutoencoderKL(**families.VAE[family_name])
        shapes = {f"model.diffusion_model.{k}": v.shape
                  for k, v in keys.model_to_original("unet", unet.state_dict()).items()}
        shapes.update({f"first_stage_model.{k}": v.shape
                       for k, v in keys.model_to_original("vae", vae.state_dict()).items()})
        for name, (class_name, config) in families.TEXT[family_name].items():
            model = getattr(transformers, class_name)(CLIPTextConfig(**config))
            prefix, style = families.TEXT_ENCODERS[family_name][name]
            convert = keys.clip_to_original if style == "clip" else keys.openclip_to_original
            shapes.update({prefix + k: v.shape for k, v in convert(model.state_dict()).items()})
    return shapes


FAMILIES = [("sd1", 4, "v1", "StableDiffusionPipeline", "epsilon"),
            ("sd1", 9, "inpainting", "StableDiffusionInpaintPipeline", "epsilon"),
            ("sd2", 4, "v2", "StableDiffusionPipeline", "v_prediction"),
            ("sdxl-base", 4, "xl_base", "StableDiffusionXLPipeline", "epsilon"),
            ("sdxl-base", 9, "xl_inpaint", "StableDiffusionXLInpaintPipeline", "epsilon"),
            ("sdxl-refiner", 4, "xl_refiner", "StableDiffusionXLImg2ImgPipeline", "epsilon")]


@pytest.mark.parametrize("name,in_channels,diffusers_type,pipeline,prediction", FAMILIES,
                         ids=[f"{f[0]}-{f[1]}ch" for f in FAMILIES])
def test_detects_full_size_families(name, in_channels, diffusers_type, pipeline, prediction):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from diffloom_single_file import families

    shapes = _full_size_keys(name, in_channels)
    family = families.detect(shapes)
    assert (family.name, family.in_channels, family.pipeline, family.prediction_type) == \
        (name, in_channels, pipeline, prediction)
    assert infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()}) == diffusers_type
    # Without text encoders (a UNet alone) the cross-attention width still tells the family.
    unet_only = {k: s for k, s in shapes.items() if k.startswith("model.diffusion_model.")}
    assert families.detect(unet_only).name == name


@pytest.mark.parametrize("name", ["sd1", "sdxl-base", "sdxl-refiner"])
def test_full_size_unet_keys_match_diffusers_conversion(name):
    """Every original key lands on the diffusers key diffusers' own converter puts it on (tagged values)."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from diffloom_single_file import families, keys

    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**families.UNET[name])
    names = list(reference.state_dict())
    tagged = {k: torch.tensor([float(i)]) for i, k in enumerate(names)}
    original = {f"model.diffusion_model.{k}": v for k, v in keys.model_to_original("unet", tagged).items()}
    converted = convert_ldm_unet_checkpoint(original, dict(reference.config))
    assert {k: int(v.item()) for k, v in converted.items()} == {k: i for i, k in enumerate(names)}


def test_standalone_vae_file_uses_the_known_config(tmp_path, offline):
    """A VAE alone (keys at the top level, like the public fine-tuned VAEs), loaded with no config at all."""
    from safetensors.torch import save_file

    from diffloom import AutoencoderKL
    from diffloom_single_file import families, keys

    with torch.device("meta"):
        shapes = AutoencoderKL(**families.VAE["sd1"]).state_dict()
    tensors = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in keys.model_to_original("vae", shapes).items()}
    save_file(tensors, str(tmp_path / "vae.safetensors"))
    vae = AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512)
    assert vae.config.scaling_factor == 0.18215 and vae.dtype == torch.float32


# -- refusals ---------------------------------------------------------------------------------------------------

def _rewrite(src, dst, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst))
    return dst


def test_unknown_and_missing_keys_are_named(tiny_sd_path, sd_file, tmp_path):
    from diffloom import StableDiffusionPipeline

    def add_unet_key(t):
        t["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(1)

    def add_stray_key(t):
        t["some_other_model.weight"] = torch.zeros(1)

    def drop_key(t):
        del t["first_stage_model.decoder.up.0.block.0.conv1.bias"]

    cases = [(add_unet_key, "input_blocks.1.1.extra.weight"),
             (add_stray_key, "some_other_model.weight"),
             (drop_key, "decoder.up.0.block.0.conv1.bias")]
    for i, (change, named) in enumerate(cases):
        path = _rewrite(sd_file, tmp_path / f"bad{i}.safetensors", change)
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            StableDiffusionPipeline.from_single_file(path, config=tiny_sd_path)


def test_tokenizer_is_required_and_error_says_how(sd_file, offline):
    from diffloom import StableDiffusionPipeline

    with pytest.raises(ValueError, match=r"holds no tokenizer.*config=.*tokenizer=") as info:
        StableDiffusionPipeline.from_single_file(sd_file)
    assert "'tokenizer'" in str(info.value)


def test_pickled_checkpoint_needs_opt_in(tiny_sd_path, sd_file, tmp_path):
    from safetensors.torch import load_file

    from diffloom import StableDiffusionPipeline
    from diffloom.modeling import WeightsError

    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": load_file(str(sd_file)), "global_step": 1}, ckpt)
    with pytest.raises(WeightsError, match="allow_pickle=True"):
        StableDiffusionPipeline.from_single_file(ckpt, config=tiny_sd_path)
    pipe = StableDiffusionPipeline.from_single_file(ckpt, config=tiny_sd_path, allow_pickle=True)
    assert _max_diff(pipe, StableDiffusionPipeline.from_single_file(sd_file, config=tiny_sd_path)) == 0.0


# -- the convert command ------------------------------------------------------------------------------------------

def test_convert_both_ways(tiny_sd_path, tmp_path, offline, capsys):
    from diffloom import StableDiffusionPipeline
    from diffloom.cli import main

    single = tmp_path / "model.safetensors"
    assert main(["convert", str(tiny_sd_path), str(single)]) == 0
    folder = tmp_path / "back"
    assert main(["convert", str(single), str(folder), "--config", str(tiny_sd_path)]) == 0
    assert (folder / "model_index.json").is_file() and (folder / "tokenizer" / "tokenizer_config.json").is_file()
    assert _max_diff(StableDiffusionPipeline.from_pretrained(tiny_sd_path),
                     StableDiffusionPipeline.from_pretrained(folder)) == 0.0


def test_convert_errors_are_one_line(tiny_sd_path, sd_file, tmp_path, offline, capsys):
    from diffloom.cli import main

    cases = [(["convert", str(sd_file), str(tmp_path / "out")], "holds no tokenizer"),
             (["convert", str(tmp_path / "nope.safetensors"), str(tmp_path / "out")], "does not exist"),
             (["convert", str(tiny_sd_path), str(sd_file)], "already exists"),
             (["convert", str(tiny_sd_path), str(tmp_path / "model.bin")], ".safetensors name")]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffloom convert: error:") and message in err and "\n" not in err, err


# -- original training configs --------------------------------------------------------------------------------------

_VAE_YAML = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                          "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                          "attn_resolutions": [], "dropout": 0.0}}
# The model sections of the public v1-inference.yaml, v2-inference-v.yaml and sd_xl_base.yaml.
ORIGINAL_CONFIGS = {
    "sd1": {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                                   "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                                   "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True,
                                   "transformer_depth": 1, "context_dim": 768, "legacy": False}},
        "first_stage_config": {"params": _VAE_YAML}}}},
    "sd2": {"model": {"params": {
        "parameterization": "v", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
        "scale_factor": 0.18215,
        "unet_config": {"params": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                                   "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
                                   "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
                                   "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024,
                                   "legacy": False}},
        "first_stage_config": {"params": _VAE_YAML}}}},
    "sdxl-base": {"model": {"params": {
        "scale_factor": 0.13025,
        "denoiser_config": {"params": {"scaling_config": {
            "target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"}}},
        "network_config": {"params": {"adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4,
                                      "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2],
                                      "num_res_blocks": 2, "channel_mult": [1, 2, 4], "num_head_channels": 64,
                                      "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
                                      "context_dim": 2048}},
        "first_stage_config": {"params": _VAE_YAML}}}},
}


@pytest.mark.parametrize("name", list(ORIGINAL_CONFIGS))
def test_original_config_gives_the_known_configs(name):
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from diffloom_single_file import families, original_config

    yaml = ORIGINAL_CONFIGS[name]
    ours = original_config.unet(yaml)
    theirs = create_unet_diffusers_config_from_ldm(yaml, {})
    for key, value in ours.items():
        expected = theirs.get(key, 1 if key == "transformer_layers_per_block" else None)
        assert _as_lists(value) == _as_lists(expected), key
        assert _as_lists(value) == _as_lists(families.UNET[name].get(key, value)), key
    vae = original_config.vae(yaml)
    assert {k: _as_lists(v) for k, v in vae.items()} == \
        {k: _as_lists(families.VAE[name][k]) for k in vae}
    assert original_config.scheduler(yaml)["prediction_type"] == families.Family(name).prediction_type


def _as_lists(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_original_config_loads_a_file(tmp_path, offline):
    """A small model with the LDM defaults the yaml cannot change (32 norm groups), read through its yaml."""
    import diffusers
    import yaml
    from safetensors.torch import save_file

    from diffloom import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffloom_single_file import keys

    config = {"model": {"params": {
        "parameterization": "v", "scale_factor": 0.5,
        "unet_config": {"params": {"in_channels": 4, "out_channels": 4, "model_channels": 32,
                                   "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2],
                                   "num_heads": 2, "transformer_depth": 1, "context_dim": tiny.TEXT_HIDDEN}},
        "first_stage_config": {"params": {"ddconfig": {"z_channels": 4, "in_channels": 3, "out_ch": 3, "ch": 32,
                                                       "ch_mult": [1, 2], "num_res_blocks": 1}}}}}}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    unet = tiny._perturbed(diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=tiny.TEXT_HIDDEN, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        1)
    vae = tiny._perturbed(diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1,
                                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                                  up_block_types=("UpDecoderBlock2D",) * 2), 2)
    tokenizer = tiny.clip_tokenizer(tmp_path / "vocab")
    text_encoder = tiny.clip_text_encoder(tokenizer)
    tensors = {f"model.diffusion_model.{k}": v for k, v in keys.model_to_original("unet", unet.state_dict()).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in keys.model_to_original("vae", vae.state_dict()).items()})
    tensors.update({f"cond_stage_model.transformer.{k}": v
                    for k, v in keys.clip_to_original(text_encoder.state_dict()).items()})
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    for cls, reference in ((UNet2DConditionModel, unet), (AutoencoderKL, vae)):
        model = cls.from_single_file(path, original_config=tmp_path / "model.yaml")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items())
    pipe = StableDiffusionPipeline.from_single_file(path, original_config=config, tokenizer=tokenizer,
                                                    text_encoder=text_encoder)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.vae.config.scaling_factor == 0.5
    with pytest.raises(ValueError, match="not both"):
        StableDiffusionPipeline.from_single_file(path, original_config=config, config=tmp_path)


def test_sources_other_than_local_files(sd_file, offline):
    from diffloom import StableDiffusionPipeline, UNet2DModel
    from diffloom.hub import LoadError

    with pytest.raises(ValueError, match="only huggingface.co file URLs"):
        StableDiffusionPipeline.from_single_file("https://example.com/model.safetensors")
    with pytest.raises(LoadError, match="someone/model"):  # offline: nothing is fetched
        StableDiffusionPipeline.from_single_file("https://huggingface.co/someone/model/blob/main/model.safetensors")
    with pytest.raises(ValueError, match="is not a file"):
        StableDiffusionPipeline.from_single_file(sd_file.parent)
    with pytest.raises(ValueError, match="UNet2DModel has no single-file layout"):
        UNet2DModel.from_single_file(sd_file)


def test_sdxl_inpainting_round_trip(tmp_path, offline):
    from diffloom import DiffusionPipeline

    folder = tiny.save_sdxl_folder(tmp_path / "xl-inpaint", in_channels=9)
    original = DiffusionPipeline.from_pretrained(folder)
    path = tmp_path / "xl-inpaint.safetensors"
    original.save_single_file(path)
    pipe = DiffusionPipeline.from_single_file(path, config=folder)
    assert type(pipe).__name__ == "StableDiffusionXLInpaintPipeline" == type(original).__name__
    assert _max_diff(original, pipe) == 0.0
