"""The model shipped inside diffloom_faces (shapes-128) makes what its prompts ask for.

Every colour x shape x background prompt is generated at the model's default settings and judged by a small
detector written here: the background is the median colour of the border, the shape is what differs from it, its
colour is the nearest of the five reference colours, and its kind follows from how much of its bounding box it
fills (circle pi/4, square 1, triangle 1/2). The detector itself is first checked on shapes drawn with PIL.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import diffloom
from diffloom import DiffusionPipeline, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import diffloom_faces.models

SHIPPED = diffloom_faces.models.SHIPPED_MODEL
TRAINING = Path(__file__).resolve().parents[1] / "training"

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
           "purple": (140, 60, 190)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
COMBOS = list(itertools.product(COLOURS, FILL, BACKGROUNDS))
PROMPTS = [f"a {c} {s} on a {b} background" for c, s, b in COMBOS]


# -- the detector ----------------------------------------------------------------------------------------------


def measure(image: Image.Image):
    """(foreground colour RGB, fill ratio of the bounding box), or None when no shape stands out."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1)
    mask = distance > 45  # half the closest shape/background pair (purple on gray)
    if mask.sum() < 30:
        return None
    # Rows and columns with a tenth of the fullest one's pixels: stray pixels do not stretch the box.
    per_row, per_col = mask.sum(axis=1), mask.sum(axis=0)
    rows = np.flatnonzero(per_row >= max(2, 0.1 * per_row.max()))
    cols = np.flatnonzero(per_col >= max(2, 0.1 * per_col.max()))
    fill = mask.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    core = mask & (distance > 0.7 * distance.max())  # away from the anti-aliased rim
    return np.median(rgb[core], axis=0), fill


def judge(image: Image.Image):
    """(colour name, shape name) the image shows, or (None, None)."""
    measured = measure(image)
    if measured is None:
        return None, None
    rgb, fill = measured
    colour = min(COLOURS, key=lambda c: np.linalg.norm(rgb - np.array(COLOURS[c])))
    return colour, min(FILL, key=lambda s: abs(FILL[s] - fill))


def score(images, combos=COMBOS):
    """(share with the right colour, share with the right shape)."""
    verdicts = [judge(im) for im in images]
    colour = sum(v[0] == c for v, (c, _, _) in zip(verdicts, combos)) / len(combos)
    shape = sum(v[1] == s for v, (_, s, _) in zip(verdicts, combos)) / len(combos)
    return colour, shape


def colour_error(images, combos=COMBOS) -> float:
    """Mean distance (0-255 RGB) between each shape's colour and its reference colour."""
    errors = []
    for image, (c, _, _) in zip(images, combos):
        measured = measure(image)
        errors.append(441.0 if measured is None else np.linalg.norm(measured[0] - np.array(COLOURS[c])))
    return float(np.mean(errors))


def drawn(colour, shape, background, box=(30, 40, 90, 100)) -> Image.Image:
    image = Image.new("RGB", (128, 128), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=COLOURS[colour])
    return image


def test_detector_reads_drawn_shapes():
    images = [drawn(c, s, b, box=(10 + 7 * i % 40, 20 + 5 * i % 30, 70 + 7 * i % 40, 80 + 5 * i % 30))
              for i, (c, s, b) in enumerate(COMBOS)]
    assert score(images) == (1.0, 1.0)


# -- the shipped folder ----------------------------------------------------------------------------------------


def test_shipped_folder_is_a_small_sd_pipeline():
    index = json.loads((SHIPPED / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 20 * 2 ** 20, f"the shipped model is {size / 2 ** 20:.1f} MiB, over the 20 MiB budget"
    assert not list(SHIPPED.rglob("*.bin")), "weights must be safetensors"
    unet = json.loads((SHIPPED / "unet" / "config.json").read_text())
    tokenizer = json.loads((SHIPPED / "tokenizer" / "tokenizer_config.json").read_text())
    text = json.loads((SHIPPED / "text_encoder" / "config.json").read_text())
    assert tokenizer["model_max_length"] == text["max_position_embeddings"] == 16
    assert unet["sample_size"] * 8 == 128 and unet["cross_attention_dim"] == text["hidden_size"]


@pytest.fixture
def training_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(TRAINING))
    import shapes

    return shapes


def test_shipped_tokenizer_is_the_one_training_writes(training_modules, tmp_path):
    tokenizer = training_modules.build_tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_text() == (SHIPPED / "tokenizer" / name).read_text(), name
    ids = tokenizer("a purple triangle on a black background").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "purple</w>", "triangle</w>", "on</w>", "a</w>", "black</w>",
        "background</w>", "<|endoftext|>"]


def test_training_data_is_seeded_and_the_detector_reads_it(training_modules):
    images, prompts = training_modules.sample_batch(24, torch.Generator().manual_seed(5))
    again, prompts_again = training_modules.sample_batch(24, torch.Generator().manual_seed(5))
    assert torch.equal(images, again) and prompts == prompts_again
    pil = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)) for im in images]
    combos = [(p.split()[1], p.split()[2], None) for p in prompts]
    assert score(pil, combos) == (1.0, 1.0)


# -- what the model draws ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    pipe = DiffusionPipeline.from_pretrained(SHIPPED, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def defaults():
    return json.loads((SHIPPED / "diffloom_defaults.json").read_text())


def generate(pipe, prompts, seed=0, **kwargs):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, **kwargs).images


@pytest.fixture(scope="module")
def guided_images(pipe, defaults):
    return generate(pipe, PROMPTS, **defaults)


def test_default_settings_draw_what_the_prompt_says(guided_images):
    colour, shape = score(guided_images)
    print(f"default settings: colour {colour:.0%}, shape {shape:.0%}")
    assert colour >= 0.9 and shape >= 0.9


def test_guidance_sharpens_colours(pipe, defaults, guided_images):
    """This model follows its prompts well even without guidance (guidance 1.0 scores about as high), so what is
    checked is what guidance measurably does: it pulls the colours closer to the references, and it runs through
    the unconditional branch, whose own images ignore the text."""
    assert defaults["guidance_scale"] > 1
    plain = generate(pipe, PROMPTS, num_inference_steps=defaults["num_inference_steps"], guidance_scale=1.0)
    guided_error, plain_error = colour_error(guided_images), colour_error(plain)
    print(f"guidance 1.0: colour/shape {score(plain)}, colour error {plain_error:.2f} vs {guided_error:.2f} guided")
    assert guided_error < plain_error
    unconditional = generate(pipe, [""] * 15, num_inference_steps=defaults["num_inference_steps"],
                             guidance_scale=1.0)
    assert score(unconditional, COMBOS[::3])[0] < 0.5  # about one in five by chance


def test_same_seed_same_image(pipe, defaults):
    prompt = ["a yellow triangle on a gray background"]
    first = np.asarray(generate(pipe, prompt, seed=3, **defaults)[0])
    again = np.asarray(generate(pipe, prompt, seed=3, **defaults)[0])
    other = np.asarray(generate(pipe, prompt, seed=4, **defaults)[0])
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 5


def test_scheduler_round_trip_gives_the_same_image(pipe, defaults):
    prompt = ["a blue square on a white background"]
    original = pipe.scheduler
    try:
        before = np.asarray(generate(pipe, prompt, seed=11, **defaults)[0])
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        euler = np.asarray(generate(pipe, prompt, seed=11, **defaults)[0])
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        after = np.asarray(generate(pipe, prompt, seed=11, **defaults)[0])
    finally:
        pipe.scheduler = original
    assert np.array_equal(before, after)
    assert judge(Image.fromarray(euler)) == ("blue", "square")


def test_diffusers_reads_the_shipped_folder_and_draws_the_same(pipe, defaults):
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(SHIPPED, torch_dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    prompt = ["a green circle on a black background"]
    ours = pipe(prompt, generator=torch.Generator().manual_seed(7), output_type="np", **defaults).images
    theirs = reference(prompt, generator=torch.Generator().manual_seed(7), output_type="np", **defaults).images
    assert np.abs(ours - theirs).max() < 1e-3


def test_previews_of_this_vae_use_a_map_fitted_to_it(pipe):
    # Its scaling factor belongs to neither SD family, so the SD table would give false colours.
    from diffloom import LatentPreview
    from diffloom_hooks.previews import fit_latent_rgb, guess_family, latents_to_rgb

    assert guess_family(pipe) is None
    previews, seen = [], []

    class Keep:
        @diffloom.hookimpl
        def on_step_end(self, pipe, call, step):
            seen.append(step.latents[0].clone())

    pipe("a red circle on a white background", num_inference_steps=2, output_type="latent",
         generator=torch.Generator().manual_seed(0),
         hooks=[LatentPreview(lambda i, image: previews.append(image)), Keep()])
    fitted = fit_latent_rgb(pipe.vae)
    assert len(previews) == 2
    for image, latents in zip(previews, seen):
        assert np.array_equal(np.asarray(image), np.asarray(latents_to_rgb(latents, rgb_map=fitted)))
