"""Regressions from a randomized parity sweep of the models against diffusers.

Each case is a discrepancy that was found and fixed, or a config diffusers builds that diffloom now builds too:
the "simple cross-attention" stages of unCLIP / DeepFloyd IF / Kandinsky, the k-diffusion stages of the SD x2
latent upscaler, IF / Kandinsky added embeddings and context projections, GLIGEN, plain attention and BigGAN
stages in the conditional UNet, ControlNet embedding details, Fourier timesteps given as Python floats, and the
FIR resampling of NCSN++. Configs diffusers builds but cannot run must raise a clear error here.
"""

import diffusers
import pytest
import torch

from diffloom_models.attention import AttnAddedKVProcessor, AttnProcessor
from diffloom_models.controlnet import ControlNetModel
from diffloom_models.unet_2d import UNet2DModel
from diffloom_models.unet_2d_condition import UNet2DConditionModel

ATOL = 1e-5


def _perturb(model, seed=1):
    """Nudge every weight, so zero-initialised parts (GLIGEN gates, ControlNet zero convs) matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _reference(cls, config, path):
    """A seeded diffusers model, saved with its own save_pretrained to ``path``."""
    torch.manual_seed(0)
    model = _perturb(cls(**config))
    model.save_pretrained(path)
    return model


def _err(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
            attention_head_dim=8)
CROSS = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SIMPLE = dict(down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
              up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
              mid_block_type="UNetMidBlock2DSimpleCrossAttn")
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
_boxes, _masks = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([[1., 1, 0], [1, 0, 0]])
GLIGEN = dict(boxes=_boxes, masks=_masks, positive_embeddings=_randn(2, 3, 24, seed=3))
GLIGEN_TEXT_IMAGE = dict(boxes=_boxes, masks=_masks, phrases_masks=torch.tensor([[1., 0, 1], [1, 1, 0]]),
                         image_masks=torch.tensor([[0., 1, 1], [1, 0, 0]]), phrases_embeddings=_randn(2, 3, 24, seed=4),
                         image_embeddings=_randn(2, 3, 24, seed=5))

# name: (config, extra call arguments, latent height and width)
UNET_CASES = {
    # unCLIP passes its context mask as attention_mask; the added-KV layers extend it over their own pixels.
    "unclip_simple_cross_attention": (dict(TINY, **SIMPLE, class_embed_type="identity",
                                           resnet_time_scale_shift="scale_shift"),
                                      dict(attention_mask=MASK), (8, 12)),
    "unclip_encoder_attention_mask": (dict(TINY, **SIMPLE), dict(encoder_attention_mask=MASK), (8, 12)),
    "deepfloyd_if": (dict(TINY, mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64, 64),
                          layers_per_block=[1, 2, 1],
                          down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 2,
                          up_block_types=("SimpleCrossAttnUpBlock2D",) * 2 + ("ResnetUpsampleBlock2D",),
                          cross_attention_dim=32, attention_head_dim=[4, 8, 16], encoder_hid_dim=20,
                          addition_embed_type="text", addition_embed_type_num_heads=2, act_fn="gelu",
                          time_embedding_act_fn="gelu", class_embed_type="timestep", resnet_skip_time_act=True,
                          resnet_out_scale_factor=1.414, cross_attention_norm="group_norm",
                          only_cross_attention=[False, True, False], mid_block_only_cross_attention=True,
                          in_channels=6, out_channels=6), {}, (8, 12)),
    "simple_layer_norm_context": (dict(TINY, **SIMPLE, block_out_channels=(64, 64), cross_attention_dim=64,
                                       cross_attention_norm="layer_norm", only_cross_attention=True), {}, (8, 8)),
    "kandinsky21": (dict(TINY, **SIMPLE, encoder_hid_dim=20, encoder_hid_dim_type="text_image_proj",
                         addition_embed_type="text_image", out_channels=8), {}, (8, 12)),
    "kandinsky22": (dict(TINY, **SIMPLE, encoder_hid_dim=20, encoder_hid_dim_type="image_proj",
                         addition_embed_type="image"), {}, (8, 12)),
    "kandinsky22_hint": (dict(TINY, **SIMPLE, encoder_hid_dim=20, encoder_hid_dim_type="image_proj",
                              addition_embed_type="image_hint", in_channels=8), {}, (8, 12)),
    "sd_x2_latent_upscaler": (dict(act_fn="gelu", attention_head_dim=8, norm_num_groups=None,
                                   block_out_channels=[32, 64, 64], time_cond_proj_dim=16, conv_in_kernel=1,
                                   conv_out_kernel=1, cross_attention_dim=16, in_channels=7, mid_block_type=None,
                                   down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
                                   up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
                                   resnet_time_scale_shift="scale_shift", time_embedding_type="fourier",
                                   timestep_post_act="gelu", layers_per_block=2),
                              dict(encoder_attention_mask=MASK, timestep=0.7), (8, 12)),
    # The up stages read attention_head_dim at their own position (4 for the last), not their mirror's (8).
    "attention_and_biggan_stages": (dict(TINY, down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D"),
                                         up_block_types=("ResnetUpsampleBlock2D", "AttnUpBlock2D"),
                                         attention_head_dim=[8, 4], mid_block_type="UNetMidBlock2D",
                                         resnet_out_scale_factor=2.0, resnet_skip_time_act=True), {}, (8, 12)),
    "gligen": (dict(TINY, **CROSS, attention_type="gated"), dict(cross_attention_kwargs={"gligen": GLIGEN}), (9, 13)),
    "gligen_text_image": (dict(TINY, block_out_channels=(32, 32, 64), attention_type="gated-text-image",
                               down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                               up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                               transformer_layers_per_block=[1, 2, 1], use_linear_projection=True),
                          dict(cross_attention_kwargs={"gligen": GLIGEN_TEXT_IMAGE, "scale": 0.5}), (8, 12)),
    # diffusers makes a Python float timestep float64, which the Fourier projection keeps until its sines.
    "fourier_float_timestep": (dict(TINY, **CROSS, time_embedding_type="fourier"), dict(timestep=731.3), (9, 13)),
}


def _unet_inputs(config, extra, size, batch=2):
    """Call arguments for ``config``: the context, the added conditions it needs, two timesteps."""
    height, width = size
    context_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    added = {}
    kind = config.get("addition_embed_type")
    if kind in ("text_image", "image", "image_hint"):
        width_of_image = config["cross_attention_dim"] if kind == "text_image" else config["encoder_hid_dim"]
        added["image_embeds"] = _randn(batch, width_of_image, seed=6)
    if kind == "text_image":
        added["text_embeds"] = _randn(batch, config["cross_attention_dim"], seed=7)
    if kind == "image_hint":
        added["hint"] = _randn(batch, 3, 8 * height, 8 * width, seed=8)
    in_channels = config.get("in_channels", 4) - (4 if kind == "image_hint" else 0)
    kwargs = dict(sample=_randn(batch, in_channels, height, width, seed=9), timestep=torch.tensor([7, 420]),
                  encoder_hidden_states=_randn(batch, 5, context_dim, seed=10), added_cond_kwargs=added or None)
    if config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20, 250])
    elif config.get("class_embed_type") == "identity":
        kwargs["class_labels"] = _randn(batch, config["block_out_channels"][0] * 4, seed=11)
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = _randn(batch, config["time_cond_proj_dim"], seed=12)
    return {**kwargs, **extra}


@pytest.mark.parametrize("name", list(UNET_CASES))
@torch.no_grad()
def test_unet_configs_match_diffusers(name, tmp_path):
    config, extra, size = UNET_CASES[name]
    reference = _reference(diffusers.UNet2DConditionModel, config, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    assert list(ours.attn_processors) == list(reference.attn_processors)
    kwargs = _unet_inputs(config, extra, size)
    expected = reference(**kwargs).sample
    (got,) = ours(**kwargs, return_dict=False)
    assert _err(got, expected) < ATOL
    if "gligen" in name:  # the grounding tokens do reach the fusers
        plain = ours(**{**kwargs, "cross_attention_kwargs": None}).sample
        assert _err(got, plain) > 1e-3


@torch.no_grad()
def test_added_kv_layers_get_their_own_default_processor(tmp_path):
    config, extra, size = UNET_CASES["unclip_simple_cross_attention"]
    _reference(diffusers.UNet2DConditionModel, config, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path)
    kwargs = _unet_inputs(config, extra, size)
    before = unet(**kwargs).sample
    unet.set_attn_processor(AttnProcessor())
    unet.set_default_attn_processor()
    kinds = {type(p) for p in unet.attn_processors.values()}
    assert kinds == {AttnAddedKVProcessor}
    assert torch.equal(unet(**kwargs).sample, before)


# -- ControlNet ------------------------------------------------------------------------------------------------

CN = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
          attention_head_dim=8, conditioning_embedding_out_channels=(8, 16),
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
CONTROLNET_CASES = {
    # diffusers' ControlNet embeds class timesteps with SiLU whatever act_fn is ...
    "class_timestep_mish": dict(CN, class_embed_type="timestep", act_fn="mish"),
    # ... never applies encoder_hid_proj (nor a "text_image" added embedding) ...
    "encoder_hid_dim": dict(CN, encoder_hid_dim=24, addition_embed_type="text_image"),
    # ... and builds no class embedding for "simple_projection".
    "simple_projection": dict(CN, class_embed_type="simple_projection", projection_class_embeddings_input_dim=12),
    "text_addition": dict(CN, addition_embed_type="text", addition_embed_type_num_heads=4),
    "other_stages": dict(CN, down_block_types=("AttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
                         attention_head_dim=[8, 16], num_attention_heads=[2, 2]),
}


def _controlnet_inputs(config, size=(8, 12)):
    kwargs = _unet_inputs({**config, "in_channels": 4}, {}, size)
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    kwargs["controlnet_cond"] = _randn(2, 3, size[0] * factor, size[1] * factor, seed=13)
    if config.get("class_embed_type") == "simple_projection":
        kwargs["class_labels"] = _randn(2, 12, seed=14)
    kwargs["added_cond_kwargs"] = {"image_embeds": _randn(2, 24, seed=15)}
    return kwargs


@pytest.mark.parametrize("name", list(CONTROLNET_CASES))
@torch.no_grad()
def test_controlnet_configs_match_diffusers(name, tmp_path):
    config = CONTROLNET_CASES[name]
    reference = _reference(diffusers.ControlNetModel, config, tmp_path)
    ours = ControlNetModel.from_pretrained(tmp_path)
    kwargs = _controlnet_inputs(config)
    expected_down, expected_mid = reference(**kwargs, guess_mode=True, return_dict=False)
    got_down, got_mid = ours(**kwargs, guess_mode=True, return_dict=False)
    assert len(got_down) == len(expected_down)
    assert max(_err(a, b) for a, b in zip(got_down, expected_down)) < ATOL
    assert _err(got_mid, expected_mid) < ATOL


@torch.no_grad()
def test_controlnet_from_unet_keeps_diffusers_embedding_choices(tmp_path):
    unet_config = dict(TINY, **CROSS, class_embed_type="timestep", act_fn="mish", encoder_hid_dim=24)
    reference_unet = _reference(diffusers.UNet2DConditionModel, unet_config, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path)
    reference = _perturb(diffusers.ControlNetModel.from_unet(reference_unet, conditioning_embedding_out_channels=(8,)))
    ours = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,))
    assert sorted(ours.state_dict()) == sorted(reference.state_dict())
    assert not torch.equal(ours.encoder_hid_proj.weight, unet.encoder_hid_proj.weight)  # not copied: unused
    ours.load_state_dict(reference.state_dict())
    kwargs = _controlnet_inputs({**unet_config, "conditioning_embedding_out_channels": (8,)})
    expected_down, expected_mid = reference(**kwargs, return_dict=False)
    got_down, got_mid = ours(**kwargs, return_dict=False)
    assert max(_err(a, b) for a, b in zip(got_down, expected_down)) < ATOL
    assert _err(got_mid, expected_mid) < ATOL


# -- UNet2DModel -----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_ncsnpp_fir_stages_match_diffusers_at_small_noise_levels(tmp_path):
    """The output is divided by sigma, so rounding differences show; the FIR resampling hands the next conv the
    same memory layout as diffusers (another layout picks another conv algorithm)."""
    config = dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=None,
                  attention_head_dim=None, time_embedding_type="fourier", mid_block_scale_factor=2 ** 0.5,
                  down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                  up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"))
    reference = _reference(diffusers.UNet2DModel, config, tmp_path)
    ours = UNet2DModel.from_pretrained(tmp_path)
    sample, sigmas = _randn(2, 3, 8, 12), torch.tensor([0.05, 0.3])
    assert _err(ours(sample, sigmas).sample, reference(sample, sigmas).sample) < ATOL


# -- what diffusers builds but cannot run, and other misuse, fails clearly ---------------------------------------


def _unet(**changes):
    return UNet2DConditionModel(**{**TINY, **CROSS, **changes})


@torch.no_grad()
def test_unrunnable_configs_and_calls_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="SkipDownBlock2D.*only UNet2DModel runs"):
        _unet(down_block_types=("SkipDownBlock2D", "DownBlock2D"))
    with pytest.raises(ValueError, match="dual_cross_attention"):
        _unet(dual_cross_attention=True)
    with pytest.raises(ValueError, match="encoder_hid_dim_type='image_proj': ControlNetModel"):
        ControlNetModel(**{**CN, "encoder_hid_dim": 24, "encoder_hid_dim_type": "image_proj"})
    with pytest.raises(ValueError, match="time_embedding_type='fourier'"):
        ControlNetModel.from_unet(_unet(time_embedding_type="fourier"))

    unet = _unet(**{k: v for k, v in SIMPLE.items() if k != "mid_block_type"}).eval()
    kwargs = _unet_inputs(TINY, {}, (9, 13))
    with pytest.raises(ValueError, match="SimpleCrossAttnUpBlock2D doubles sizes.*multiples of 2"):
        unet(**kwargs)
    kwargs = _unet_inputs(TINY, {}, (8, 12))
    with pytest.raises(ValueError, match="no time_cond_proj_dim"):
        unet(**kwargs, timestep_cond=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="no GLIGEN layers"):
        _unet().eval()(**kwargs, cross_attention_kwargs={"gligen": GLIGEN})
    with pytest.raises(ValueError, match=r"addition_embed_type='image' and needs added_cond_kwargs\['image_embeds'\]"):
        _unet(addition_embed_type="image", encoder_hid_dim=20).eval()(**kwargs)
