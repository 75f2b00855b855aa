"""The community pipelines shipped in diffloom_contrib, on tiny models: Marigold depth and CLIP-guided SD."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny
from diffloom import DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler, LCMScheduler, hookimpl
from diffloom.testing import (build_tiny_clip_text_encoder, build_tiny_clip_tokenizer, build_tiny_unet2d_condition,
                              build_tiny_vae)
from diffloom_contrib.marigold_depth import (MarigoldPipeline, color_map_table, colorize_depth, ensemble_depths,
                                             minimize_bfgs, normalize_range)

# -- Marigold ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marigold_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("marigold")
    tokenizer = build_tiny_clip_tokenizer(root / "vocab")
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = MarigoldPipeline(unet=build_tiny_unet2d_condition(in_channels=8), vae=build_tiny_vae(),
                            scheduler=scheduler, text_encoder=build_tiny_clip_text_encoder(tokenizer),
                            tokenizer=tokenizer)
    pipe.save_pretrained(root / "marigold")
    return root / "marigold"


@pytest.fixture
def marigold(marigold_folder, caplog):
    caplog.set_level(logging.ERROR)  # the few-steps advice is expected here
    return DiffusionPipeline.from_pretrained(marigold_folder, custom_pipeline="marigold_depth")


class ImageLatentAsDepth:
    """A random tiny UNet knows nothing of depth, so its members would share nothing to agree on. This hook
    makes the predicted clean latent the image latent plus a small share of the UNet's (noise-dependent)
    output: members then agree on a common map and differ by what the UNet made of their noise."""

    @hookimpl
    def after_denoiser(self, pipe, call, step):
        step.noise_pred = call.tensors["image_latents"] + 0.05 * step.model_output


def test_marigold_loads_by_community_name_and_by_class_name(marigold, marigold_folder):
    import json

    index = json.loads((marigold_folder / "model_index.json").read_text())
    assert index["_class_name"] == "MarigoldPipeline"
    assert sorted(k for k in index if not k.startswith("_")) == ["scheduler", "text_encoder", "tokenizer", "unet",
                                                                 "vae"]
    assert type(marigold) is MarigoldPipeline
    assert type(DiffusionPipeline.from_pretrained(marigold_folder)) is MarigoldPipeline


def test_marigold_depth_range_sizes_and_colours(marigold):
    image = tiny.image()  # 48 x 32
    out = marigold(image, denoising_steps=2, ensemble_size=3, processing_res=24, seed=0, show_progress_bar=False)
    assert out.depth_np.shape == (32, 48) and out.depth_np.dtype == np.float32
    assert out.depth_np.min() >= 0 and out.depth_np.max() <= 1 and out.depth_np.max() - out.depth_np.min() > 0.5
    assert out.uncertainty.shape == (32, 48) and (out.uncertainty >= 0).all()
    assert out.depth_colored.size == (48, 32) and out.depth_colored.mode == "RGB"
    small = marigold(image, denoising_steps=2, ensemble_size=1, processing_res=24, match_input_res=False, seed=0,
                     show_progress_bar=False, color_map=None)
    assert small.depth_np.shape == (16, 24) and small.uncertainty is None and small.depth_colored is None
    assert 0 <= small.depth_np.min() and small.depth_np.max() <= 1


@pytest.mark.parametrize("reduction", ["median", "mean"])
def test_marigold_ensembling_reduces_spread(marigold, reduction):
    # The hook below gives the clean latent, so the scheduler reads the model output as the sample itself.
    marigold.scheduler = DDIMScheduler.from_config(marigold.scheduler.config, prediction_type="sample",
                                                   set_alpha_to_one=True)
    image = tiny.image()

    def spread(ensemble_size):
        depths = [marigold(image, denoising_steps=2, ensemble_size=ensemble_size, processing_res=0, seed=seed,
                           show_progress_bar=False, color_map=None, hooks=[ImageLatentAsDepth()],
                           ensemble_kwargs={"reduction": reduction}).depth_np for seed in range(3)]
        return np.stack(depths).std(axis=0).mean()

    single, ensembled = spread(1), spread(5)
    assert ensembled < 0.6 * single, (single, ensembled)


def test_marigold_results_do_not_depend_on_batch_size_and_hooks_fire_per_step(marigold):
    steps = []

    class Counter:
        @hookimpl
        def on_step_begin(self, pipe, call, step):
            steps.append(step.index)

    kwargs = dict(denoising_steps=2, ensemble_size=3, processing_res=0, seed=3, show_progress_bar=False)
    whole = marigold(tiny.image(), **kwargs, hooks=[Counter()])
    one_by_one = marigold(tiny.image(), **kwargs, batch_size=1)
    np.testing.assert_allclose(whole.depth_np, one_by_one.depth_np, atol=1e-5)
    assert steps == [0, 1]  # once per step, not once per batch of members


def test_marigold_lcm_scheduler_and_refusals(marigold, marigold_folder):
    lcm = DiffusionPipeline.from_pretrained(marigold_folder, custom_pipeline="marigold_depth")
    lcm.scheduler = LCMScheduler.from_config(lcm.scheduler.config)
    kwargs = dict(denoising_steps=2, ensemble_size=2, processing_res=0, show_progress_bar=False)
    first, again = lcm(tiny.image(), seed=1, **kwargs), lcm(tiny.image(), seed=1, **kwargs)
    np.testing.assert_array_equal(first.depth_np, again.depth_np)
    assert 0 <= first.depth_np.min() and first.depth_np.max() <= 1

    lcm.scheduler = EulerDiscreteScheduler.from_config(lcm.scheduler.config)
    with pytest.raises(ValueError, match="DDIMScheduler or LCMScheduler, not EulerDiscreteScheduler"):
        lcm(tiny.image(), **kwargs)
    with pytest.raises(ValueError, match="ensemble_size must be an int >= 1"):
        marigold(tiny.image(), ensemble_size=0)
    with pytest.raises(ValueError, match="color_map='jet' is not one of Spectral, binary, gray, viridis"):
        marigold(tiny.image(), color_map="jet")
    with pytest.raises(TypeError, match="PIL image"):
        marigold(np.zeros((8, 8, 3)))


def test_ensemble_alignment_recovers_a_depth_map_known_up_to_scale_and_shift():
    generator = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 32), indexing="ij")
    truth = normalize_range(0.5 * xx + 0.5 * torch.sin(3 * yy) ** 2)[0]
    scales = torch.rand(6, generator=generator) * 1.5 + 0.5
    shifts = torch.rand(6, generator=generator) - 0.5
    members = scales[:, None, None] * truth + shifts[:, None, None] + 0.05 * torch.randn(6, 24, 32, generator=generator)
    single_error = np.mean([(normalize_range(m)[0] - truth).abs().mean().item() for m in members])
    for reduction in ("median", "mean"):
        merged, uncertainty = ensemble_depths(members, reduction=reduction)
        assert merged.min() == 0 and merged.max() == 1 and uncertainty.shape == truth.shape
        assert (merged - truth).abs().mean() < 0.6 * single_error
    with pytest.raises(ValueError, match="reduction='max'"):
        ensemble_depths(members, reduction="max")


def test_bfgs_finds_the_rosenbrock_minimum():
    def rosenbrock(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    found = minimize_bfgs(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), max_iter=200, tol=1e-10)
    torch.testing.assert_close(found, torch.tensor([1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-6)


def test_colour_maps():
    spectral = color_map_table("Spectral")
    np.testing.assert_allclose(spectral[0] * 255, [0x9E, 0x01, 0x42], atol=1e-6)
    np.testing.assert_allclose(spectral[-1] * 255, [0x5E, 0x4F, 0xA2], atol=1e-6)
    np.testing.assert_allclose(color_map_table("Spectral_r"), spectral[::-1])
    viridis = colorize_depth(np.array([[0.0, 0.5, 1.0]]), "viridis")
    np.testing.assert_allclose(np.asarray(viridis)[0], [[0x44, 0x01, 0x54], [0x21, 0x90, 0x8C], [0xFD, 0xE7, 0x25]],
                               atol=1)
    binary = np.asarray(colorize_depth(np.array([[0.0, 1.0]]), "binary"))
    assert binary[0, 0].tolist() == [255, 255, 255] and binary[0, 1].tolist() == [0, 0, 0]


# -- CLIP-guided Stable Diffusion -------------------------------------------------------------------------------

PROMPT = "a photo of the cat"


@pytest.fixture(scope="module")
def clip_parts(tmp_path_factory, tiny_sd_path):
    from transformers import CLIPConfig, CLIPModel

    try:  # without torchvision, transformers 5 serves CLIP image processing from this class
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    tokenizer = tiny.clip_tokenizer(tmp_path_factory.mktemp("clip-vocab"))  # the one the SD folder was saved with
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    clip_model = CLIPModel(config).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tiny_sd_path, tokenizer, clip_model, extractor


@pytest.fixture
def guided(clip_parts):
    folder, _, clip_model, extractor = clip_parts
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="clip_guided_stable_diffusion",
                                             clip_model=clip_model, feature_extractor=extractor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_score(clip_parts, images) -> float:
    """Cosine similarity of the CLIP embeddings of ``images`` (NCHW in [0, 1]) and of the prompt."""
    _, tokenizer, clip_model, extractor = clip_parts
    pixels = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(extractor.image_mean)[:, None, None], torch.tensor(extractor.image_std)[:, None, None]
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        image_features = clip_model.get_image_features(pixel_values=(pixels - mean) / std)
        text_features = clip_model.get_text_features(input_ids=ids)
    image_features = getattr(image_features, "pooler_output", image_features)
    text_features = getattr(text_features, "pooler_output", text_features)
    return F.cosine_similarity(image_features, text_features).mean().item()


def test_clip_guided_without_clip_guidance_is_stable_diffusion(guided, clip_parts):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(clip_parts[0], safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                         output_type="np").images
    ours = guided(PROMPT, num_inference_steps=3, clip_guidance_scale=0, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])  # alpha-bar and sigma formulations
def test_clip_guidance_raises_the_clip_score(guided, clip_parts, scheduler):
    guided.scheduler = scheduler.from_config(guided.scheduler.config)

    def run(scale):
        return guided(PROMPT, num_inference_steps=4, clip_guidance_scale=scale, use_cutouts=False,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images

    plain, steered = run(0), run(100)
    assert (plain - steered).abs().max() > 0.05
    assert clip_score(clip_parts, steered) > clip_score(clip_parts, plain) + 0.05


def test_clip_guidance_with_cutouts_is_seeded_and_batched(guided):
    def run(seed):
        return guided([PROMPT, "a dog"], num_inference_steps=2, clip_guidance_scale=100, num_cutouts=2,
                      clip_prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np").images

    first, again = run(0), run(0)
    assert first.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(first, again)
    unguided = guided([PROMPT, "a dog"], num_inference_steps=2, clip_guidance_scale=0,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.abs(first - unguided).max() > 1e-3
    with pytest.raises(ValueError, match="num_cutouts must be a positive int"):
        guided(PROMPT, num_cutouts=0)
    with pytest.raises(ValueError, match="clip_prompt has 3 entries for 2 prompts"):
        guided([PROMPT, "a dog"], clip_prompt=["a", "b", "c"])
