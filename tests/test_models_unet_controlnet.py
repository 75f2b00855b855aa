"""UNet2DConditionModel and ControlNetModel against diffusers: tiny seeded models, folders both ways,
non-square sizes that are not multiples of the total downsampling, the attention-processor extension point,
and the full SD 1.5 / SDXL configs counted on the meta device."""

import json

import diffusers
import pytest
import torch

from diffloom_models.attention import Attention, AttnProcessor
from diffloom_models.controlnet import ControlNetModel
from diffloom_models.unet_2d_condition import UNet2DConditionModel

ATOL = 1e-4

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
            attention_head_dim=2, sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
THREE_STAGES = dict(block_out_channels=(16, 16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SDXL_LIKE = dict(TINY, **THREE_STAGES, use_linear_projection=True, attention_head_dim=[1, 2, 4],
                 transformer_layers_per_block=[1, 1, 2], addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4, layers_per_block=2)

UNET_CONFIGS = {
    "sd1": dict(TINY, layers_per_block=2),
    "sd2": dict(TINY, **THREE_STAGES, use_linear_projection=True, attention_head_dim=[1, 2, 4],
                upcast_attention=True, flip_sin_to_cos=False, freq_shift=1),
    "sdxl": SDXL_LIKE,
    "sdxl_per_layer_depths": dict(SDXL_LIKE, transformer_layers_per_block=[1, [1, 2], [2, 1]],
                                  reverse_transformer_layers_per_block=[[1, 2, 1], [2, 1, 1], [1, 1, 1]]),
    "lcm": dict(TINY, time_cond_proj_dim=12),
    "class_labels": dict(TINY, num_class_embeds=10, resnet_time_scale_shift="scale_shift"),
    "class_timestep": dict(TINY, class_embed_type="timestep", time_embedding_act_fn="silu", center_input_sample=True),
    "class_identity": dict(TINY, class_embed_type="identity", timestep_post_act="silu"),
    "class_projection": dict(TINY, class_embed_type="projection", projection_class_embeddings_input_dim=12,
                             class_embeddings_concat=True),
    "class_simple_projection": dict(TINY, class_embed_type="simple_projection",
                                    projection_class_embeddings_input_dim=12, time_embedding_dim=40),
    "inpaint": dict(TINY, in_channels=9, conv_in_kernel=1, conv_out_kernel=1, encoder_hid_dim=20,
                    only_cross_attention=[True, False], layers_per_block=[1, 2], mid_block_type=None,
                    mid_block_scale_factor=1.5, downsample_padding=0),
    "fourier_time_midblock2d": dict(TINY, time_embedding_type="fourier", mid_block_type="UNetMidBlock2D",
                                    cross_attention_dim=[24, 24], act_fn="mish"),
}


def _plain(config) -> dict:
    """A config as JSON would hold it (lists, not tuples), without private keys."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def _perturb(model, seed=1):
    """Nudge every weight so zero-initialised parts (ControlNet's zero convs) matter in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _diffusers_model(cls, config, tmp_path, seed=0):
    torch.manual_seed(seed)
    model = _perturb(cls(**config)).eval()
    model.save_pretrained(tmp_path / "reference")
    return cls.from_pretrained(tmp_path / "reference").eval()


def _inputs(config, batch=2, height=9, width=13, seed=0):
    """UNet call arguments for ``config`` at a non-square size that the downsampling does not divide."""
    g = torch.Generator().manual_seed(seed)
    context_dim = config.get("encoder_hid_dim") or config["cross_attention_dim"]
    context_dim = context_dim[0] if isinstance(context_dim, list) else context_dim
    kwargs = dict(sample=torch.randn(batch, config.get("in_channels", 4), height, width, generator=g),
                  timestep=torch.tensor([7, 420])[:batch],
                  encoder_hidden_states=torch.randn(batch, 5, context_dim, generator=g))
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 8, generator=g),
                                       "time_ids": torch.tensor([[72.0, 104, 0, 0, 72, 104]] * batch)}
    if config.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(batch, config["time_cond_proj_dim"], generator=g)
        kwargs["timestep"] = torch.tensor(35.5)
    kind = config.get("class_embed_type")
    if config.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([3, 8])[:batch]
    elif kind == "timestep":
        kwargs["class_labels"] = torch.tensor([20, 250])[:batch]
    elif kind == "identity":
        kwargs["class_labels"] = torch.randn(batch, config["block_out_channels"][0] * 4, generator=g)
    elif kind in ("projection", "simple_projection"):
        kwargs["class_labels"] = torch.randn(batch, config["projection_class_embeddings_input_dim"], generator=g)
    return kwargs


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_matches_diffusers(name, tmp_path):
    config = UNET_CONFIGS[name]
    reference = _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "reference")
    kwargs = _inputs(config)
    with torch.no_grad():
        expected = reference(**kwargs).sample
        got = ours(**kwargs).sample
    assert got.shape == expected.shape == kwargs["sample"].shape[:1] + (4,) + kwargs["sample"].shape[2:]
    assert (got - expected).abs().max() < ATOL


def test_unet_masks_kwargs_scalar_timestep_and_tuple_output(tmp_path):
    config = UNET_CONFIGS["sd1"]
    reference = _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "reference")
    kwargs = _inputs(config, height=11, width=6)
    kwargs.update(timestep=999, encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                  cross_attention_kwargs={"scale": 0.5})
    with torch.no_grad():
        expected = reference(**kwargs).sample
        (got,) = ours(**kwargs, return_dict=False)
        unmasked = ours(**{**kwargs, "encoder_attention_mask": None}).sample
    assert (got - expected).abs().max() < ATOL
    assert (got - unmasked).abs().max() > 1e-3  # the mask does something


def test_diffloom_folders_load_in_diffusers(tmp_path):
    config = UNET_CONFIGS["sdxl"]
    _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "reference")
    ours.save_pretrained(tmp_path / "ours")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "ours").eval()
    kwargs = _inputs(config)
    with torch.no_grad():
        assert (theirs(**kwargs).sample - ours(**kwargs).sample).abs().max() < ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_run_on_cpu(dtype, tmp_path):
    config = UNET_CONFIGS["sd2"]
    _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    ours = UNet2DConditionModel.from_pretrained(tmp_path / "reference", torch_dtype=dtype)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "reference", torch_dtype=dtype).eval()
    assert ours.dtype == dtype and all(p.dtype == dtype for p in ours.parameters())
    kwargs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _inputs(config).items()}
    with torch.no_grad():
        got, expected = ours(**kwargs).sample, theirs(**kwargs).sample
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got.float() - expected.float()).abs().max() < 2e-2


# -- ControlNet ------------------------------------------------------------------------------------------------



def _controlnet_config(unet_config, **extra):
    """The ControlNet counterpart of a UNet config (no up path, no sample_size)."""
    config = {k: v for k, v in unet_config.items() if k not in ("up_block_types", "sample_size")}
    return {**config, "conditioning_embedding_out_channels": (8, 8, 16, 16), **extra}


CONTROLNET_CONFIGS = {
    "sd": _controlnet_config(TINY, layers_per_block=2),
    "sdxl": _controlnet_config(SDXL_LIKE),
    "bgr_global_pool": _controlnet_config(TINY, conditioning_embedding_out_channels=(8, 16),
                                          controlnet_conditioning_channel_order="bgr", global_pool_conditions=True,
                                          class_embed_type="timestep", mid_block_type="UNetMidBlock2D"),
}


def _controlnet_inputs(config, **kw):
    kwargs = _inputs({**config, "in_channels": 4}, **kw)
    factor = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    height, width = kwargs["sample"].shape[2:]
    kwargs["controlnet_cond"] = torch.randn(kwargs["sample"].shape[0], 3, height * factor, width * factor,
                                            generator=torch.Generator().manual_seed(5))
    return kwargs


@pytest.mark.parametrize("name", list(CONTROLNET_CONFIGS))
@pytest.mark.parametrize("guess_mode,scale", [(False, 1.0), (True, 0.7)])
def test_controlnet_matches_diffusers(name, guess_mode, scale, tmp_path):
    config = CONTROLNET_CONFIGS[name]
    reference = _diffusers_model(diffusers.ControlNetModel, config, tmp_path)
    ours = ControlNetModel.from_pretrained(tmp_path / "reference")
    kwargs = _controlnet_inputs(config, height=10, width=7)
    if config.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([20.0, 250.0])
    kwargs.update(guess_mode=guess_mode, conditioning_scale=scale)
    with torch.no_grad():
        expected = reference(**kwargs)
        got = ours(**kwargs)
    assert len(got.down_block_res_samples) == len(expected.down_block_res_samples)
    for a, b in zip(got.down_block_res_samples, expected.down_block_res_samples):
        assert a.shape == b.shape and (a - b).abs().max() < ATOL
    assert (got.mid_block_res_sample - expected.mid_block_res_sample).abs().max() < ATOL
    down, mid = ours(**kwargs, return_dict=False)
    assert torch.equal(mid, got.mid_block_res_sample)


def test_unet_with_controlnet_residuals_matches_diffusers(tmp_path):
    unet_config, cn_config = UNET_CONFIGS["sdxl"], CONTROLNET_CONFIGS["sdxl"]
    ref_unet = _diffusers_model(diffusers.UNet2DConditionModel, unet_config, tmp_path / "u")
    ref_cn = _diffusers_model(diffusers.ControlNetModel, cn_config, tmp_path / "c", seed=1)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "u" / "reference")
    controlnet = ControlNetModel.from_pretrained(tmp_path / "c" / "reference")
    kwargs = _controlnet_inputs(cn_config)
    cond = kwargs.pop("controlnet_cond")
    with torch.no_grad():
        ref_down, ref_mid = ref_cn(**kwargs, controlnet_cond=cond, return_dict=False)
        expected = ref_unet(**kwargs, down_block_additional_residuals=ref_down,
                            mid_block_additional_residual=ref_mid).sample
        out = controlnet(**kwargs, controlnet_cond=cond)
        got = unet(**kwargs, down_block_additional_residuals=out.down_block_res_samples,
                   mid_block_additional_residual=out.mid_block_res_sample).sample
        plain = unet(**kwargs).sample
    assert (got - expected).abs().max() < ATOL
    assert (got - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pairs"):
        unet(**kwargs, down_block_additional_residuals=out.down_block_res_samples)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_controlnet_from_unet_copies_like_diffusers(name, tmp_path):
    config = UNET_CONFIGS[name]
    reference = _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "reference")
    torch.manual_seed(0)
    expected = diffusers.ControlNetModel.from_unet(reference, conditioning_embedding_out_channels=(8, 16))
    got = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    theirs, ours = expected.state_dict(), got.state_dict()
    assert sorted(ours) == sorted(theirs)
    unet_state = unet.state_dict()
    for key, value in ours.items():
        if key.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            assert not value.any(), key
        elif not key.startswith("controlnet_cond_embedding"):
            assert torch.equal(value, unet_state[key]) and torch.equal(value, theirs[key]), key
    theirs_config, ours_config = _plain(expected.config), _plain(got.config)
    assert {k: ours_config[k] for k in theirs_config} == theirs_config
    # A fresh ControlNet changes nothing: every residual is zero.
    got.save_pretrained(tmp_path / "fresh")
    kwargs = _controlnet_inputs({**config, "conditioning_embedding_out_channels": (8, 16)})
    with torch.no_grad():
        out = diffusers.ControlNetModel.from_pretrained(tmp_path / "fresh")(**kwargs)
    assert not out.mid_block_res_sample.any() and not any(s.any() for s in out.down_block_res_samples)


# -- the attention-processor extension point --------------------------------------------------------------------


class Recorder:
    """Delegates to the default processor and remembers what it was given (no **kwargs: it takes ``tag``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, tag=None):
        self.calls.append((type(encoder_hidden_states).__name__, tag))
        return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask)


class ScaledOutput(torch.nn.Module):
    """A processor with a weight of its own (as an IP-Adapter's has)."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if isinstance(encoder_hidden_states, tuple):  # IP-Adapter style (text, [images])
            encoder_hidden_states = encoder_hidden_states[0]
        return self.gain * AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask)


def test_attn_processors_round_trip(tmp_path):
    config = UNET_CONFIGS["sd1"]
    reference = _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "reference")
    original = unet.attn_processors
    # The same order too: code that numbers attention layers (IP-Adapter files) relies on it.
    assert list(original) == list(reference.attn_processors)
    kwargs = _inputs(config)
    with torch.no_grad():
        before = unet(**kwargs).sample

        recorder = Recorder()
        unet.set_attn_processor(recorder)
        after = unet(**kwargs, cross_attention_kwargs={"tag": "t", "scale": 0.3}).sample
        assert torch.equal(before, after)
        assert len(recorder.calls) == len(original) and set(recorder.calls) == {("NoneType", "t"), ("Tensor", "t")}

        unet.set_attn_processor(original)
        assert unet.attn_processors == original
        assert torch.equal(unet(**kwargs).sample, before)

        key = next(k for k in original if "attn2" in k)
        unet.set_attn_processor({**original, key: ScaledOutput()})
        weight = key.removesuffix("processor") + "processor.gain"
        assert weight in unet.state_dict()
        # "scale" is not in ScaledOutput.forward's signature, so it is not passed.
        assert torch.equal(unet(**kwargs, cross_attention_kwargs={"scale": 0.3}).sample, before)
        unet.set_attn_processor(original)
        assert weight not in unet.state_dict()
    with pytest.raises(ValueError, match="missing"):
        unet.set_attn_processor({key: AttnProcessor()})


def test_ip_adapter_image_projection_reaches_processors(tmp_path):
    config = UNET_CONFIGS["sd1"]
    _diffusers_model(diffusers.UNet2DConditionModel, config, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "reference")
    kwargs = _inputs(config)
    with torch.no_grad():
        before = unet(**kwargs).sample
        # What an IP-Adapter loader does: an image projection, a config flag, its processors.
        unet.encoder_hid_proj = torch.nn.Linear(6, 24)
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        kwargs["added_cond_kwargs"] = {"image_embeds": torch.randn(2, 6)}
        with pytest.raises(ValueError, match="IP-Adapter"):
            unet(**kwargs)
        seen = []

        class Probe(ScaledOutput):
            def forward(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
                seen.append(encoder_hidden_states)
                return super().forward(attn, hidden_states, encoder_hidden_states, **kwargs)

        unet.set_attn_processor(Probe())
        after = unet(**kwargs).sample
    assert torch.allclose(before, after, atol=1e-6)
    text, image = next(s for s in seen if isinstance(s, tuple))
    assert text.shape == (2, 5, 24) and image.shape == (2, 24)


def test_attention_matches_diffusers_on_feature_maps():
    torch.manual_seed(0)
    reference = diffusers.models.attention_processor.Attention(
        16, heads=2, dim_head=8, bias=True, norm_num_groups=4, eps=1e-6, residual_connection=True,
        rescale_output_factor=2.0, _from_deprecated_attn_block=True).eval()
    ours = Attention(16, heads=2, dim_head=8, bias=True, norm_num_groups=4, eps=1e-6, residual_connection=True,
                     rescale_output_factor=2.0)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 5, 3)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-6


# -- full-size configs -------------------------------------------------------------------------------------------

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=2048,
            attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.mark.parametrize("config,count", [(SD15, 859_520_964), (SDXL, 2_567_463_684)])
def test_full_size_unets_build_on_meta_with_diffusers_parameter_counts(config, count):
    with torch.device("meta"):
        ours = UNet2DConditionModel(**config)
        theirs = diffusers.UNet2DConditionModel(**config)
        controlnet = ControlNetModel.from_unet(ours, load_weights_from_unet=False)
        their_controlnet = diffusers.ControlNetModel.from_unet(theirs, load_weights_from_unet=False)
    assert ours.num_parameters() == theirs.num_parameters() == count
    assert all(p.is_meta for p in ours.parameters())
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert controlnet.num_parameters() == their_controlnet.num_parameters()
    assert sorted(controlnet.state_dict()) == sorted(their_controlnet.state_dict())
