"""Textual inversion on the tiny SDXL pipeline, loaded the way diffusers users do it: one embedding file holds
``clip_l`` and ``clip_g`` vectors, and each half is loaded under the same token into its own tokenizer/text
encoder pair. The two text encoders here have different widths, so a half loaded into the wrong encoder fails.
"""

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from diffloom import StableDiffusionXLPipeline
from test_adapters_ti import max_diff, run  # 2 steps, tiny size, seed 0, numpy images

WIDTH_L, WIDTH_G = tiny.TEXT_HIDDEN, 48  # CLIP ViT-L and (the tiny stand-in of) OpenCLIP ViT-bigG
TOL = 1e-5
SEED_L, SEED_G = 11, 12

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    """A tiny SDXL folder whose second text encoder is wider than the first, as in the real model."""
    path = tmp_path_factory.mktemp("tiny-sdxl-ti") / "pipe"
    components = tiny.diffusers_sdxl_components(path.parent / "build")
    components["text_encoder_2"] = tiny.clip_text_encoder_with_projection(components["tokenizer_2"], seed=4,
                                                                          hidden_size=WIDTH_G)
    time_ids = 6 * tiny.ADDITION_TIME_EMBED_DIM
    config = dict(tiny.sdxl_unet_config(), cross_attention_dim=WIDTH_L + WIDTH_G,
                  projection_class_embeddings_input_dim=time_ids + WIDTH_G)
    torch.manual_seed(1)
    components["unet"] = tiny._perturbed(diffusers.UNet2DConditionModel(**config), 2)
    diffusers.StableDiffusionXLPipeline(**components, add_watermarker=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sdxl(ours, sdxl_path):
    """Ours (shared, unloaded from both tokenizers after each test) and a fresh diffusers pipeline."""
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    ref.set_progress_bar_config(disable=True)
    yield ours, ref
    for tokenizer, encoder in ((ours.tokenizer, ours.text_encoder), (ours.tokenizer_2, ours.text_encoder_2)):
        ours.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)


def embedding_file(folder, n):
    """An SDXL embedding file of ``n`` seeded vectors per text encoder, read back as users read it."""
    vectors = {"clip_l": torch.randn(n, WIDTH_L, generator=torch.Generator().manual_seed(SEED_L + n)),
               "clip_g": torch.randn(n, WIDTH_G, generator=torch.Generator().manual_seed(SEED_G + n))}
    save_file(vectors, str(folder / f"emb{n}.safetensors"))
    return load_file(str(folder / f"emb{n}.safetensors"))


def load(pipe, state_dict, token, encoders=("clip_g", "clip_l")):
    pairs = {"clip_l": (pipe.text_encoder, pipe.tokenizer), "clip_g": (pipe.text_encoder_2, pipe.tokenizer_2)}
    for key in encoders:
        encoder, tokenizer = pairs[key]
        pipe.load_textual_inversion(state_dict[key], token=token, text_encoder=encoder, tokenizer=tokenizer)


def encode(pipe, prompt, negative_prompt=None, **kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device=torch.device("cpu"), negative_prompt=negative_prompt, **kwargs)


def embeds_diff(a, b):
    return max(max_diff(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n", [1, 3])
def test_both_encoders_match_diffusers_and_unload(sdxl, tmp_path, n):
    ours, ref = sdxl
    prompt, negative = "a photo of the <s> cat", "the <s> dog"
    base_embeds, base_image = encode(ours, prompt, negative), run(ours, prompt, negative_prompt=negative)
    state_dict = embedding_file(tmp_path, n)
    load(ours, state_dict, "<s>")
    load(ref, state_dict, "<s>")
    for mine, theirs in ((ours.tokenizer, ref.tokenizer), (ours.tokenizer_2, ref.tokenizer_2)):
        assert mine.get_added_vocab() == theirs.get_added_vocab()
        assert ours.maybe_convert_prompt(prompt, mine) == ref.maybe_convert_prompt(prompt, theirs)
    assert ours.text_encoder_2.get_input_embeddings().weight.shape[-1] == WIDTH_G

    cases = [(prompt, negative, {}), (["the <s>", "a <s> and the <s>"], None, {}),
             ("a cat", "a dog", {"prompt_2": "the <s> cat", "negative_prompt_2": "<s>"})]
    for p, neg, second in cases:
        a, b = encode(ours, p, neg, **second), encode(ref, p, neg, **second)
        assert [t.shape for t in a] == [t.shape for t in b]
        assert embeds_diff(a, b) <= TOL
    loaded_embeds = encode(ours, prompt, negative)
    assert embeds_diff(loaded_embeds, base_embeds) > 0.01  # the token changed what both encoders see
    loaded_image = run(ours, prompt, negative_prompt=negative)
    assert max_diff(loaded_image, run(ref, prompt, negative_prompt=negative)) <= TOL

    # Unloading from both tokenizers, as diffusers users do, gives back the exact outputs of before.
    names = ["<s>"] + [f"<s>_{i}" for i in range(1, n)]
    for pipe in (ours, ref):
        pipe.unload_textual_inversion(names, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion(names, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    assert embeds_diff(encode(ours, prompt, negative), base_embeds) == 0
    assert max_diff(run(ours, prompt, negative_prompt=negative), base_image) == 0
    assert embeds_diff(encode(ours, prompt, negative), encode(ref, prompt, negative)) <= TOL
    for pipe in (ours, ref):
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            assert "<s>" not in tokenizer.get_vocab()
            assert encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)


@pytest.mark.parametrize("only", ["clip_l", "clip_g"])
def test_token_in_one_tokenizer_only(sdxl, tmp_path, only):
    """diffusers accepts a token loaded into one tokenizer: the other spells it out as ordinary text."""
    ours, ref = sdxl
    state_dict = embedding_file(tmp_path, 2)
    load(ours, state_dict, "<s>", encoders=[only])
    load(ref, state_dict, "<s>", encoders=[only])
    prompt = "a photo of the <s> cat"
    for mine, theirs in ((ours.tokenizer, ref.tokenizer), (ours.tokenizer_2, ref.tokenizer_2)):
        assert ours.maybe_convert_prompt(prompt, mine) == ref.maybe_convert_prompt(prompt, theirs)
    assert embeds_diff(encode(ours, prompt, "<s>"), encode(ref, prompt, "<s>")) <= TOL
    assert max_diff(run(ours, prompt), run(ref, prompt)) <= TOL


def test_wrong_encoder_and_one_sided_unload(sdxl, tmp_path):
    ours, ref = sdxl
    state_dict = embedding_file(tmp_path, 2)
    for pipe in (ours, ref):  # clip_l vectors are too narrow for the second encoder
        with pytest.raises(ValueError):
            pipe.load_textual_inversion(state_dict["clip_l"], token="<s>", text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    with pytest.raises(ValueError, match=f"size {WIDTH_L}.* size {WIDTH_G}"):
        ours.load_textual_inversion(state_dict["clip_l"], token="<s>", text_encoder=ours.text_encoder_2,
                                    tokenizer=ours.tokenizer_2)
    load(ours, state_dict, "<s>")
    load(ref, state_dict, "<s>")
    # Unloading from the second tokenizer only leaves the first one's token working, in both libraries.
    for pipe in (ours, ref):
        pipe.unload_textual_inversion(["<s>", "<s>_1"], tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
        assert "<s>" in pipe.tokenizer.get_vocab() and "<s>" not in pipe.tokenizer_2.get_vocab()
    prompt = "the <s> cat"
    assert embeds_diff(encode(ours, prompt), encode(ref, prompt)) <= TOL
    assert max_diff(run(ours, prompt), run(ref, prompt)) <= TOL


def test_one_tensor_of_vectors_for_a_list_of_tokens(sdxl, tmp_path):
    """SDXL pivotal-tuning files hold n vectors per encoder for the n tokens "<s0>" ... (diffusers' own example)."""
    ours, ref = sdxl
    prompt = "a <s0><s1> photo of the cat"
    base_embeds = encode(ours, prompt)
    state_dict, tokens = embedding_file(tmp_path, 2), ["<s0>", "<s1>"]
    load(ours, state_dict, tokens)
    load(ref, state_dict, tokens)
    for mine, theirs in ((ours.tokenizer, ref.tokenizer), (ours.tokenizer_2, ref.tokenizer_2)):
        assert mine.get_added_vocab() == theirs.get_added_vocab()
    ids = ours.tokenizer_2.convert_tokens_to_ids(tokens)
    assert torch.equal(ours.text_encoder_2.get_input_embeddings().weight[ids], state_dict["clip_g"])
    assert embeds_diff(encode(ours, prompt, "<s1>"), encode(ref, prompt, "<s1>")) <= TOL
    assert max_diff(run(ours, prompt), run(ref, prompt)) <= TOL
    for pipe in (ours, ref):
        pipe.unload_textual_inversion(tokens, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
        pipe.unload_textual_inversion(tokens, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    assert embeds_diff(encode(ours, prompt), base_embeds) == 0
    assert embeds_diff(encode(ref, prompt), base_embeds) <= TOL

    for pipe in (ours, ref):  # as many vectors as tokens, or diffusers and we refuse
        with pytest.raises(ValueError):
            pipe.load_textual_inversion(state_dict["clip_l"], token=["<a>", "<b>", "<c>"])
    with pytest.raises(ValueError, match="2 embeddings but 3 tokens"):
        ours.load_textual_inversion(state_dict["clip_l"], token=["<a>", "<b>", "<c>"])


def test_whole_sdxl_file_into_one_encoder_is_refused(sdxl, tmp_path):
    ours, ref = sdxl
    state_dict = embedding_file(tmp_path, 1)
    with pytest.raises(ValueError):
        ref.load_textual_inversion(state_dict, token="<s>")
    with pytest.raises(ValueError, match="'clip_g' tensor with text_encoder=pipe.text_encoder_2"):
        ours.load_textual_inversion(state_dict, token="<s>")
    with pytest.raises(ValueError, match="'clip_l' tensor"):
        ours.load_textual_inversion(str(tmp_path / "emb1.safetensors"), token="<s>")
    assert "<s>" not in ours.tokenizer.get_vocab()
