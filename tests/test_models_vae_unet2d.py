"""AutoencoderKL and UNet2DModel against diffusers, with tiny seeded models at non-square sizes.

Each reference model is built by diffusers, saved with its own ``save_pretrained`` and loaded by both
libraries, so these tests also check that diffloom reads diffusers' folders (and the other way round).
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffloom import AutoencoderKL, UNet2DModel
from diffloom.modeling import WeightsError

ATOL = 1e-4


def build_and_save(cls, config: dict, path, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(**config).eval()
    model.save_pretrained(path)
    return model


def assert_close(ours, ref, atol=ATOL):
    assert ours.shape == ref.shape
    err = (ours.float() - ref.float()).abs().max().item()
    assert err <= atol, f"max abs error {err} > {atol}"


# -- AutoencoderKL -----------------------------------------------------------------------------------------

VAE_CONFIGS = {
    # Attention in the encoder/decoder stages too; sample_size 16 makes 24x40 images tile (latent tiles of 8).
    "attn_blocks": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, latent_channels=4,
                        sample_size=16, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
    # Three stages (latent tiles of 8), no quant convs and no mid attention (the Flux / SD3 style switches).
    "no_quant": dict(block_out_channels=(8, 8, 16), norm_num_groups=4, layers_per_block=2, latent_channels=3,
                     sample_size=32, down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=False, use_post_quant_conv=False,
                     mid_block_add_attention=False, scaling_factor=0.3611, shift_factor=0.1159),
}


@pytest.fixture(scope="module", params=list(VAE_CONFIGS))
def vae_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vae_{request.param}")
    ref = build_and_save(diffusers.AutoencoderKL, VAE_CONFIGS[request.param], path)
    return ref, AutoencoderKL.from_pretrained(path), path


def _set_modes(models, tiling: bool, slicing: bool):
    for m in models:
        m.enable_tiling() if tiling else m.disable_tiling()
        m.enable_slicing() if slicing else m.disable_slicing()


@pytest.mark.parametrize("tiling,slicing", [(False, False), (True, False), (False, True), (True, True)])
@torch.no_grad()
def test_vae_matches_diffusers(vae_pair, tiling, slicing):
    ref, ours, _ = vae_pair
    _set_modes((ref, ours), tiling, slicing)
    torch.manual_seed(1)
    image = torch.randn(2, 3, 24, 40)
    latent_shape = (2, ref.config.latent_channels, 24 // 2 ** (len(ref.config.block_out_channels) - 1),
                    40 // 2 ** (len(ref.config.block_out_channels) - 1))
    latents = torch.randn(latent_shape)

    p_ref, p_ours = ref.encode(image).latent_dist, ours.encode(image).latent_dist
    assert_close(p_ours.mean, p_ref.mean)
    assert_close(p_ours.std, p_ref.std)
    assert_close(p_ours.var, p_ref.var)
    assert_close(p_ours.mode(), p_ref.mode())
    assert_close(p_ours.kl(), p_ref.kl(), atol=1e-3)
    assert_close(p_ours.kl(p_ref), p_ref.kl(p_ours), atol=1e-3)
    assert_close(p_ours.sample(torch.Generator().manual_seed(3)), p_ref.sample(torch.Generator().manual_seed(3)))
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    gens_ref = [torch.Generator().manual_seed(s) for s in (4, 5)]
    assert_close(p_ours.sample(gens), p_ref.sample(gens_ref))

    assert_close(ours.decode(latents).sample, ref.decode(latents).sample)
    out = ours(image, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample
    assert_close(out, ref(image, sample_posterior=True, generator=torch.Generator().manual_seed(6)).sample)
    _set_modes((ref, ours), False, False)


@torch.no_grad()
def test_vae_tiling_really_tiles(vae_pair):
    _, ours, _ = vae_pair
    latents = torch.randn(1, ours.config.latent_channels, 12, 20)
    plain = ours.decode(latents).sample
    ours.enable_tiling()
    tiled = ours.decode(latents).sample
    explicit = ours.tiled_decode(latents).sample
    ours.disable_tiling()
    assert tiled.shape == plain.shape
    assert (tiled - plain).abs().max() > 1e-3  # the seams are blended, not computed whole
    assert torch.equal(tiled, explicit)


@torch.no_grad()
def test_vae_tuples_and_config(vae_pair):
    ref, ours, _ = vae_pair
    image = torch.randn(1, 3, 16, 24)
    (posterior,) = ours.encode(image, return_dict=False)
    assert_close(posterior.mean, ref.encode(image).latent_dist.mean)
    (decoded,) = ours.decode(posterior.mode(), return_dict=False)
    assert decoded.shape == (1, 3, 16, 24)
    (recon,) = ours(image, return_dict=False)
    assert_close(recon, ref(image).sample)
    for key in ("scaling_factor", "shift_factor", "force_upcast", "latents_mean", "latents_std"):
        assert ours.config[key] == ref.config[key]
    assert ours.config.scaling_factor == ours.scaling_factor  # config values read as attributes


# -- UNet2DModel --------------------------------------------------------------------------------------------

_TWO_STAGES = dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4)

UNET_CONFIGS = {
    "plain": dict(_TWO_STAGES, down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), freq_shift=1, flip_sin_to_cos=False),
    "attention": dict(_TWO_STAGES, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), center_input_sample=True, norm_eps=1e-6),
    "resnet_resample_scale_shift": dict(
        _TWO_STAGES, down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"), resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=4, downsample_type="resnet", upsample_type="resnet", time_embedding_dim=24),
    "attn_resample_three_stages": dict(
        block_out_channels=(8, 8, 16), norm_num_groups=4, layers_per_block=2, attention_head_dim=None,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), downsample_type="resnet",
        upsample_type="resnet", add_attention=False, downsample_padding=0),
    "class_embeds": dict(_TWO_STAGES, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=5),
    "class_timestep": dict(_TWO_STAGES, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), class_embed_type="timestep"),
    "class_identity": dict(_TWO_STAGES, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), class_embed_type="identity"),
    "learned_time_no_mid": dict(_TWO_STAGES, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), time_embedding_type="learned",
                                num_train_timesteps=1000, mid_block_type=None),
    # NCSN++ (score SDE-VE): Fourier noise-level features, FIR skip stages, groups derived from widths.
    "fourier_skip": dict(block_out_channels=(32, 32), norm_num_groups=None, layers_per_block=1,
                         attention_head_dim=None, time_embedding_type="fourier", mid_block_scale_factor=2 ** 0.5,
                         norm_eps=1e-6, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                         up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D")),
}


def _class_labels(name: str, batch: int, config: dict):
    if name == "class_identity":
        return torch.randn(batch, config["block_out_channels"][0] * 4)
    if name.startswith("class_"):
        return torch.tensor([1, 3][:batch])
    return None


def _timesteps(name: str):
    if name == "fourier_skip":  # noise levels sigma
        return torch.tensor([0.5, 20.0])
    return torch.tensor([10, 500])


@pytest.fixture(scope="module", params=list(UNET_CONFIGS))
def unet_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"unet_{request.param}")
    ref = build_and_save(diffusers.UNet2DModel, UNET_CONFIGS[request.param], path)
    return request.param, ref, UNet2DModel.from_pretrained(path), path


@torch.no_grad()
def test_unet2d_matches_diffusers(unet_pair):
    name, ref, ours, _ = unet_pair
    assert [n for n, _ in ours.named_children()] == [n for n, _ in ref.named_children()]
    torch.manual_seed(1)
    sample = torch.randn(2, 3, 16, 24)
    labels = _class_labels(name, 2, UNET_CONFIGS[name])
    t = _timesteps(name)
    assert_close(ours(sample, t, class_labels=labels).sample, ref(sample, t, class_labels=labels).sample)
    # One timestep for the whole batch: a Python number or a 0-d tensor.
    scalar = t[1] if name == "fourier_skip" else 7
    for step in (scalar, torch.as_tensor(scalar)):
        (out,) = ours(sample, step, labels, return_dict=False)
        assert_close(out, ref(sample, step, class_labels=labels).sample)


def test_unet2d_class_label_errors(unet_pair):
    name, _, ours, _ = unet_pair
    sample = torch.randn(1, 3, 8, 8)
    if ours.class_embedding is not None:
        with pytest.raises(ValueError, match="class_labels"):
            ours(sample, 3)
    else:
        with pytest.raises(ValueError, match="no class embedding"):
            ours(sample, 3, class_labels=torch.tensor([1]))


def test_unet2d_size_must_divide(unet_pair):
    _, _, ours, _ = unet_pair
    with pytest.raises(ValueError, match="height and width that are multiples of"):
        ours(torch.randn(1, 3, 16, 15), 3)


# -- folders both ways, dtypes, errors ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet", "vae"])
@torch.no_grad()
def test_diffloom_folder_loads_in_diffusers(kind, tmp_path):
    if kind == "unet":
        config, ref_cls, ours_cls = UNET_CONFIGS["attention"], diffusers.UNet2DModel, UNet2DModel
    else:
        config, ref_cls, ours_cls = VAE_CONFIGS["attn_blocks"], diffusers.AutoencoderKL, AutoencoderKL
    ref = build_and_save(ref_cls, config, tmp_path / "ref")
    ours_cls.from_pretrained(tmp_path / "ref").save_pretrained(tmp_path / "ours")
    back = ref_cls.from_pretrained(tmp_path / "ours").eval()
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["_class_name"] == ref_cls.__name__
    for key, value in ref.config.items():
        if not key.startswith("_"):
            expected = list(value) if isinstance(value, tuple) else value  # JSON has no tuples
            assert back.config[key] == expected, key
    sample = torch.randn(1, 3, 16, 24)
    if kind == "unet":
        assert_close(back(sample, 5).sample, ref(sample, 5).sample)
    else:
        assert_close(back(sample).sample, ref(sample).sample)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_loads(dtype, tmp_path):
    unet_full = build_and_save(diffusers.UNet2DModel, UNET_CONFIGS["attention"], tmp_path / "unet")
    vae_full = build_and_save(diffusers.AutoencoderKL, VAE_CONFIGS["attn_blocks"], tmp_path / "vae")
    unet_ref = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet", torch_dtype=dtype)
    vae_ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=dtype)
    unet = UNet2DModel.from_pretrained(tmp_path / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=dtype)
    assert unet.dtype == dtype and vae.dtype == dtype
    assert all(p.dtype == dtype for p in [*unet.parameters(), *vae.parameters()])

    sample, t = torch.randn(2, 3, 16, 24), torch.tensor([10, 500])
    out = unet(sample.to(dtype), t).sample
    assert out.dtype == dtype
    # Same arithmetic as diffusers in the same dtype; loosely the float32 result.
    assert_close(out, unet_ref(sample.to(dtype), t).sample, atol=1e-3)
    assert_close(out, unet_full(sample, t).sample, atol=5e-2)
    latents = vae.encode(sample.to(dtype)).latent_dist.mode()
    assert latents.dtype == dtype
    assert_close(latents, vae_ref.encode(sample.to(dtype)).latent_dist.mode(), atol=1e-3)
    assert_close(latents, vae_full.encode(sample).latent_dist.mode(), atol=5e-2)
    decoded = vae.decode(latents).sample
    assert_close(decoded, vae_ref.decode(latents).sample, atol=1e-3)
    assert_close(decoded, vae_full.decode(latents.float()).sample, atol=1e-1)


@torch.no_grad()
def test_fp16_variant_written_by_diffusers(tmp_path):
    ref = build_and_save(diffusers.UNet2DModel, UNET_CONFIGS["plain"], tmp_path / "full")
    ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = UNet2DModel.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    # Without torch_dtype the fp16 weights are upcast to float32, as diffusers does.
    upcast = UNet2DModel.from_pretrained(tmp_path / "fp16", variant="fp16")
    ref_upcast = diffusers.UNet2DModel.from_pretrained(tmp_path / "fp16", variant="fp16")
    assert upcast.dtype == ref_upcast.dtype == torch.float32
    sample = torch.randn(1, 3, 16, 24)
    assert_close(upcast(sample, 3).sample, ref_upcast(sample, 3).sample)
    assert_close(half(sample.half(), 3).sample, ref_upcast(sample, 3).sample, atol=5e-2)


def test_config_weights_mismatch_names_key_and_file(tmp_path):
    build_and_save(diffusers.UNet2DModel, UNET_CONFIGS["plain"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["in_channels"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as info:
        UNet2DModel.from_pretrained(tmp_path)
    message = str(info.value)
    assert "conv_in.weight" in message and "diffusion_pytorch_model.safetensors" in message
    assert "(8, 3, 3, 3)" in message and "(8, 4, 3, 3)" in message


@pytest.mark.parametrize("kind", ["unet", "vae"])
@torch.no_grad()
def test_legacy_attention_key_names(kind, tmp_path):
    """Older checkpoints call the spatial attention's projections query/key/value/proj_attn."""
    if kind == "unet":
        ref = build_and_save(diffusers.UNet2DModel, UNET_CONFIGS["attention"], tmp_path)
        cls = UNet2DModel
    else:
        ref = build_and_save(diffusers.AutoencoderKL, VAE_CONFIGS["attn_blocks"], tmp_path)
        cls = AutoencoderKL
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for key, value in load_file(str(weights)).items():
        for new, old in renames.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(weights))
    ours = cls.from_pretrained(tmp_path)
    sample = torch.randn(1, 3, 16, 24)
    if kind == "unet":
        assert_close(ours(sample, 5).sample, ref(sample, 5).sample)
    else:
        assert_close(ours(sample).sample, ref(sample).sample)
