"""Textual inversion on the tiny Stable Diffusion pipeline, against diffusers loading the same embedding files."""

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny
from diffloom import StableDiffusionPipeline
from diffloom.modeling import WeightsError

TOL = 2e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ours(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd(ours, tiny_sd_path):
    """Ours (shared, unloaded after each test) and a fresh diffusers pipeline."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref.set_progress_bar_config(disable=True)
    yield ours, ref
    ours.unload_textual_inversion()


def run(pipe, prompt, **kwargs):
    return pipe(prompt=prompt, num_inference_steps=2, height=tiny.IMAGE_HEIGHT, width=tiny.IMAGE_WIDTH,
                output_type="np", generator=torch.Generator().manual_seed(0), **kwargs).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def vectors(n, seed):
    return torch.randn(n, tiny.TEXT_HIDDEN, generator=torch.Generator().manual_seed(seed))


def test_single_vector_diffusers_file(sd, tmp_path):
    ours, ref = sd
    base = run(ours, "a photo of the cat")
    folder = tmp_path / "cat"
    folder.mkdir()
    save_file({"<cat>": vectors(1, 1)[0]}, str(folder / "learned_embeds.safetensors"))
    ours.load_textual_inversion(folder)
    ref.load_textual_inversion(folder)
    assert len(ours.tokenizer) == len(ref.tokenizer)
    for prompt in ("a photo of the <cat>", ["a <cat> and the dog", "the <cat> <cat>"]):
        a, b = run(ours, prompt, negative_prompt=None), run(ref, prompt)
        assert max_diff(a, b) <= TOL
    a = run(ours, "a photo", negative_prompt="<cat>")
    assert max_diff(a, run(ref, "a photo", negative_prompt="<cat>")) <= TOL
    ours.unload_textual_inversion()
    assert max_diff(run(ours, "a photo of the cat"), base) == 0
    assert "<cat>" not in ours.tokenizer.get_vocab()


def test_multi_vector_a1111_and_lists(sd, tmp_path):
    ours, ref = sd
    torch.save({"string_to_param": {"*": vectors(3, 2)}, "name": "<dog>"}, tmp_path / "dog.pt")
    save_file({"emb_params": vectors(2, 3)}, str(tmp_path / "style.safetensors"))
    with pytest.raises(WeightsError, match="allow_pickle"):
        ours.load_textual_inversion(str(tmp_path / "dog.pt"))
    files = [str(tmp_path / "dog.pt"), str(tmp_path / "style.safetensors")]
    ours.load_textual_inversion(files, token=["<dog>", "<style>"], allow_pickle=True)
    ref.load_textual_inversion(files, token=["<dog>", "<style>"])
    assert ours.tokenizer.get_added_vocab() == ref.tokenizer.get_added_vocab()
    prompt = "a <dog> photo in <style>"
    assert ours.maybe_convert_prompt(prompt, ours.tokenizer) == ref.maybe_convert_prompt(prompt, ref.tokenizer) \
        == "a <dog> <dog>_1 <dog>_2 photo in <style> <style>_1"
    assert max_diff(run(ours, prompt), run(ref, prompt)) <= TOL

    # Unloading one multi-vector token takes its companions along and renumbers the rest.
    ours.unload_textual_inversion("<dog>")
    assert set(ours.tokenizer.get_added_vocab()) >= {"<style>", "<style>_1"}
    assert not any(t.startswith("<dog>") for t in ours.tokenizer.get_vocab())
    ref.unload_textual_inversion(["<dog>", "<dog>_1", "<dog>_2"])
    assert max_diff(run(ours, "a photo in <style>"), run(ref, "a photo in <style>")) <= TOL


def test_emb_params_named_by_file_and_token_override(sd, tmp_path):
    ours, ref = sd
    save_file({"emb_params": vectors(1, 4)}, str(tmp_path / "<shiny>.safetensors"))
    ours.load_textual_inversion(str(tmp_path / "<shiny>.safetensors"))
    assert "<shiny>" in ours.tokenizer.get_vocab()
    save_file({"<a>": vectors(1, 5)}, str(tmp_path / "a.safetensors"))
    ours.load_textual_inversion(str(tmp_path / "a.safetensors"), token="<b>")
    ref.load_textual_inversion(str(tmp_path / "a.safetensors"), token="<b>")
    assert max_diff(run(ours, "the <b> cat"), run(ref, "the <b> cat")) <= TOL


def test_errors(sd, tmp_path):
    ours, _ = sd
    save_file({"<cat>": vectors(1, 1)[0]}, str(tmp_path / "cat.safetensors"))
    ours.load_textual_inversion(str(tmp_path / "cat.safetensors"))
    with pytest.raises(ValueError, match="'<cat>' is already in the tokenizer"):
        ours.load_textual_inversion(str(tmp_path / "cat.safetensors"))
    with pytest.raises(ValueError, match="size 7"):
        ours.load_textual_inversion({"<wide>": torch.zeros(7)})
    with pytest.raises(ValueError, match="token="):
        ours.load_textual_inversion(torch.zeros(tiny.TEXT_HIDDEN))
    with pytest.raises(ValueError, match="2 embeddings but 1 tokens"):
        ours.load_textual_inversion([{"<x>": vectors(1, 0)}, {"<y>": vectors(1, 0)}], token=["<x>"])
    with pytest.raises(ValueError, match="not loaded"):
        ours.unload_textual_inversion("<nope>")


def test_second_text_encoder_by_argument(sd, tmp_path):
    """SDXL loads an embedding into each text encoder by passing text_encoder= and tokenizer=."""
    ours, _ = sd
    tokenizer = tiny.clip_tokenizer(tmp_path / "vocab2")
    encoder = tiny.clip_text_encoder(tokenizer, seed=7)
    before = len(ours.tokenizer)
    ours.load_textual_inversion({"<two>": vectors(2, 6)}, tokenizer=tokenizer, text_encoder=encoder)
    assert len(ours.tokenizer) == before and "<two>_1" in tokenizer.get_vocab()
    ids = tokenizer.convert_tokens_to_ids(["<two>", "<two>_1"])
    assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors(2, 6))
    assert ours.maybe_convert_prompt("a <two>", tokenizer) == "a <two> <two>_1"
    ours.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)
    assert len(tokenizer) == before and encoder.get_input_embeddings().weight.shape[0] == before


def test_pipeline_saved_with_an_embedding_reads_back_like_diffusers(tiny_sd_path, tmp_path):
    # The tokenizer and text encoder of the saved folder carry the added words; no adapter has loaded them in
    # this process, yet prompts must be spelled out (and unloading must work) exactly as in diffusers.
    donor = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    donor.load_textual_inversion({"<dog>": vectors(3, 4)})
    donor.save_pretrained(tmp_path / "with-dog")
    ours = StableDiffusionPipeline.from_pretrained(tmp_path / "with-dog")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "with-dog")
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of the <dog>"
    assert ours.maybe_convert_prompt(prompt, ours.tokenizer) == "a photo of the <dog> <dog>_1 <dog>_2"
    assert max_diff(run(ours, prompt), run(ref, prompt)) == 0
    ours.unload_textual_inversion()
    ref.unload_textual_inversion()
    assert len(ours.tokenizer) == len(ref.tokenizer)
    assert max_diff(run(ours, "a photo of the cat"), run(ref, "a photo of the cat")) == 0
