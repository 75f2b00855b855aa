"""LoRA on the tiny Stable Diffusion pipeline, against diffusers + PEFT loading the same files.

The LoRA files are built here with random weights: diffusers/PEFT keys from the module paths of the UNet and the
text encoder, kohya keys derived from the same paths (dots to underscores, ``lora_unet_`` / ``lora_te_``).
"""

import gc
import os
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny
from diffloom import StableDiffusionPipeline

TOL = 2e-4
PROMPT = "a photo of the red cat"
RANK = 2
# Layers a LoRA usually targets, plus a 3x3 convolution and a time-embedding projection.
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "resnets.0.conv1", "resnets.0.time_emb_proj")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ours(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.unload_lora_weights()


@pytest.fixture
def sd(ours, tiny_sd_path):
    """Ours (shared by the tests, unloaded after each, so each test also checks unloading) and a fresh diffusers
    pipeline (diffusers' unload under transformers 5 re-initialises the text encoder, so it is not reused)."""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref.set_progress_bar_config(disable=True)
    yield ours, ref
    ours.unload_lora_weights()


def run(pipe, seed=0, **kwargs):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 2, "height": tiny.IMAGE_HEIGHT, "width": tiny.IMAGE_WIDTH,
              "output_type": "np", "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(**kwargs).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def targets(model, names):
    return [(n, m) for n, m in model.named_modules() if n.endswith(names) and isinstance(m, (torch.nn.Linear,
                                                                                               torch.nn.Conv2d))]


def lora_pair(module, generator, scale=0.3):
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=generator)
        up = torch.randn(module.out_channels, RANK, 1, 1, generator=generator)
    else:
        down = torch.randn(RANK, module.in_features, generator=generator)
        up = torch.randn(module.out_features, RANK, generator=generator)
    return down * scale, up * scale


def text_path(name):
    # LoRA files name the CLIP layers from the transformers 4 layout (``text_model.encoder...``).
    return name if name.startswith("text_model.") else "text_model." + name


def peft_lora(pipe, seed, text=True):
    """A diffusers/PEFT-format LoRA of the UNet (and the text encoder)."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in targets(pipe.unet, UNET_TARGETS):
        sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = lora_pair(module, generator)
    if text:
        for name, module in targets(pipe.text_encoder, TEXT_TARGETS):
            down, up = lora_pair(module, generator)
            sd[f"text_encoder.{text_path(name)}.lora_A.weight"] = down
            sd[f"text_encoder.{text_path(name)}.lora_B.weight"] = up
    return sd


def kohya_lora(pipe, seed, alpha=lambda generator: 1.0):
    """A kohya/A1111-format LoRA (``lora_unet_...``, ``lora_te_...``) with alphas.

    One alpha for all layers by default: diffusers 0.42 drops per-layer alphas of attention layers (it
    builds PEFT ``alpha_pattern`` keys that match no module), so only a common alpha can be compared."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for prefix, model, names, rename in (("lora_unet_", pipe.unet, UNET_TARGETS, str),
                                         ("lora_te_", pipe.text_encoder, TEXT_TARGETS, text_path)):
        for name, module in targets(model, names):
            key = prefix + rename(name).replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = lora_pair(module, generator)
            sd[key + ".alpha"] = torch.tensor(alpha(generator))
    return sd


def save(tmp_path, name, sd):
    folder = tmp_path / name
    folder.mkdir()
    save_file(sd, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_formats_and_call_scale(sd, tmp_path, fmt):
    ours, ref = sd
    base = run(ours)
    sd_dict = peft_lora(ref, 1) if fmt == "peft" else kohya_lora(ref, 1)
    folder = save(tmp_path, fmt, sd_dict)
    if fmt == "peft":
        ours.load_lora_weights(folder)
        ref.load_lora_weights(folder)
    else:  # from a file with weight_name=
        ours.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="k")
        ref.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="k")
    assert ours.get_active_adapters() == ref.get_active_adapters()
    assert ours.get_list_adapters() == ref.get_list_adapters()
    for scale in (1.0, 0.5):
        kw = {"cross_attention_kwargs": {"scale": scale}}
        a, b = run(ours, **kw), run(ref, **kw)
        assert max_diff(a, b) <= TOL
        assert max_diff(a, base) > 1e-2  # the LoRA does change the image
    ours.disable_lora()
    assert max_diff(run(ours), base) == 0
    ours.enable_lora()
    ours.unload_lora_weights()
    assert max_diff(run(ours), base) == 0
    assert not any(m._forward_hooks for m in ours.unet.modules())


def test_file_path_and_old_keys(sd, tmp_path):
    """A LoRA file given by path, in the ``lora.down/up`` spelling, the UNet only."""
    ours, ref = sd
    peft = peft_lora(ref, 2, text=False)
    renamed = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in peft.items()}
    save_file(renamed, str(tmp_path / "old.safetensors"))
    save_file(peft, str(tmp_path / "new.safetensors"))
    ours.load_lora_weights(str(tmp_path / "old.safetensors"))
    ref.load_lora_weights(str(tmp_path / "new.safetensors"))
    assert max_diff(run(ours), run(ref)) <= TOL


def test_kohya_alpha_per_layer(sd):
    """Each layer's update is scaled by its own alpha / rank: the same as folding that factor into lora_up."""
    ours, ref = sd
    lora = kohya_lora(ref, 9, alpha=lambda generator: float(torch.randint(1, 5, (), generator=generator)))
    folded = {}
    for key, value in lora.items():
        if key.endswith(".lora_up.weight"):
            folded[key] = value * lora[key.replace(".lora_up.weight", ".alpha")] / RANK
        elif key.endswith(".lora_down.weight"):
            folded[key] = value
    ours.load_lora_weights(lora, adapter_name="alpha")
    with_alpha = run(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights(folded, adapter_name="folded")
    assert max_diff(run(ours), with_alpha) <= 1e-5


def test_two_adapters_mixed_and_fused(sd, tmp_path):
    ours, ref = sd
    base = run(ours)
    first, second = peft_lora(ref, 3), kohya_lora(ref, 4)
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(first), adapter_name="one")
        pipe.load_lora_weights(dict(second), adapter_name="two")
    assert ours.get_active_adapters() == ref.get_active_adapters()
    for pipe in (ours, ref):
        pipe.set_adapters(["one", "two"], adapter_weights=[0.7, 0.4])
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["one", "two"]
    kw = {"cross_attention_kwargs": {"scale": 0.5}}
    unfused = run(ours, **kw)
    assert max_diff(unfused, run(ref, **kw)) <= TOL

    weights = {n: p.detach().clone() for n, p in [*ours.unet.named_parameters(), *ours.text_encoder.named_parameters()]}
    for pipe in (ours, ref):
        pipe.fuse_lora(lora_scale=0.8)
    fused = run(ours)
    assert max_diff(fused, run(ref)) <= TOL
    for pipe in (ours, ref):
        pipe.unfuse_lora()
    after = dict([*ours.unet.named_parameters(), *ours.text_encoder.named_parameters()])
    assert all(torch.equal(weights[n], after[n]) for n in weights)  # exactly the original weights
    assert max_diff(run(ours, **kw), unfused) == 0

    ours.set_adapters("two")
    ref.set_adapters("two")
    assert max_diff(run(ours), run(ref)) <= TOL
    ours.delete_adapters("two")
    ref.delete_adapters("two")
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"unet": ["one"], "text_encoder": ["one"]}
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["one"]
    ours.unload_lora_weights()
    assert max_diff(run(ours), base) == 0


def test_fuse_then_unload_keeps_the_update(sd):
    """``fuse_lora`` then ``unload_lora_weights`` bakes the LoRA in, as in diffusers."""
    ours, ref = sd
    originals = {n: p.detach().clone() for n, p in [*ours.unet.named_parameters(),
                                                      *ours.text_encoder.named_parameters()]}
    base = run(ours)
    for pipe in (ours, ref):
        pipe.load_lora_weights(peft_lora(ref, 10))
        pipe.fuse_lora(lora_scale=0.6)
        pipe.unload_lora_weights()
    assert ours.get_list_adapters() == {}
    assert not any(m._forward_hooks for m in ours.unet.modules())
    assert max_diff(run(ours), run(ref)) <= TOL
    with torch.no_grad():  # put the shared pipeline back for the other tests
        for name, p in [*ours.unet.named_parameters(), *ours.text_encoder.named_parameters()]:
            p.copy_(originals[name])
    assert max_diff(run(ours), base) == 0


def test_per_block_weights(sd):
    ours, ref = sd
    lora = {k: v for k, v in peft_lora(ref, 5).items() if ".attentions." in k or k.startswith("text_encoder.")}
    weights = {"text_encoder": 0.3, "unet": {"down": 0.5, "up": {"block_1": 1.5}}}
    for pipe in (ours, ref):
        pipe.load_lora_weights(dict(lora), adapter_name="blocks")
        pipe.set_adapters("blocks", weights)
    assert max_diff(run(ours), run(ref)) <= TOL
    with pytest.raises(ValueError, match="down.block_1"):
        ours.set_adapters("blocks", {"unet": {"down": {"block_1": 1.0}}})  # down block 1 has no attention
    with pytest.raises(ValueError, match="vae"):
        ours.set_adapters("blocks", {"vae": 1.0})


def test_errors(sd):
    ours, ref = sd
    lora = peft_lora(ref, 6, text=False)
    with pytest.raises(ValueError, match="unet.down_blocks.0.nonexistent.lora_A.weight"):
        ours.load_lora_weights({**lora, "unet.down_blocks.0.nonexistent.lora_A.weight": torch.zeros(2, 2)})
    bad = dict(lora)
    key = next(k for k in bad if k.endswith("to_q.lora_B.weight"))
    bad[key] = torch.zeros(3, RANK)
    with pytest.raises(ValueError, match="to_q"):
        ours.load_lora_weights(bad)
    assert ours.get_list_adapters() == {}
    ours.load_lora_weights(dict(lora), adapter_name="x")
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(dict(lora), adapter_name="x")
    with pytest.raises(ValueError, match="'y'"):
        ours.set_adapters(["y"])


def test_from_pipe_and_threads_share_adapters(sd):
    ours, ref = sd
    ours.load_lora_weights(peft_lora(ref, 7))
    other = StableDiffusionPipeline.from_pipe(ours)
    assert other.get_active_adapters() == ours.get_active_adapters()
    assert max_diff(run(other), run(ours)) == 0
    # The call scale belongs to the call: two threads with different scales get their own results.
    scales = [0.2, 1.0, 0.2, 1.0]
    alone = {s: run(ours, cross_attention_kwargs={"scale": s}) for s in set(scales)}
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda s: run(ours, cross_attention_kwargs={"scale": s}), scales))
    assert all(max_diff(image, alone[s]) == 0 for image, s in zip(together, scales))


def count_tensors():
    with warnings.catch_warnings():  # some torch.distributed objects warn when isinstance looks at them
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_kib():
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_load_unload_cycles_do_not_leak(sd):
    ours, ref = sd
    lora = peft_lora(ref, 8)

    def cycle():
        ours.load_lora_weights(dict(lora), adapter_name="cycle")
        ours.fuse_lora()
        ours.unfuse_lora()
        ours.unload_lora_weights()

    tracemalloc.start()
    cycle()  # warm-up: first-use caches (interned names, dict capacity) are not a leak
    gc.collect()
    tensors = count_tensors()
    rss = _rss_kib()
    start, _ = tracemalloc.get_traced_memory()
    for _ in range(20):
        cycle()
    gc.collect()
    end, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert end - start < 64 * 1024, f"python allocations grew by {end - start} bytes over 20 cycles"
    assert count_tensors() <= tensors
    assert not any(m._forward_hooks for m in [*ours.unet.modules(), *ours.text_encoder.modules()])
    assert _rss_kib() - rss < 20 * 1024


def test_old_processor_keys_and_sdxl_text_encoder_prefixes(ours, tmp_path):
    """diffusers' old ``processor.to_q_lora`` spelling names the same layers; ``lora_te1_`` / ``lora_te2_`` target
    SDXL's two text encoders (given here as a pipeline-like object with two CLIP encoders)."""
    from types import SimpleNamespace

    from diffloom_adapters.lora import LoraAdapter

    peft = {k: v for k, v in peft_lora(ours, 11, text=False).items() if ".attn" in k}
    old = {}
    for key, value in peft.items():
        module, _, rest = key.rpartition(".lora_")
        attn, _, projection = module.rpartition(".")
        if projection == "0":  # to_out.0
            attn, projection = attn.rpartition(".")[0], "to_out"
        old[f"{attn}.processor.{projection}_lora.{'down' if rest.startswith('A') else 'up'}.weight"] = value
    ours.load_lora_weights(peft, adapter_name="new")
    new_image = run(ours)
    ours.unload_lora_weights()
    ours.load_lora_weights(old, adapter_name="old")
    assert max_diff(run(ours), new_image) == 0

    tokenizer = tiny.clip_tokenizer(tmp_path / "vocab")
    pipe = SimpleNamespace(unet=None, text_encoder=tiny.clip_text_encoder(tokenizer, seed=1),
                           text_encoder_2=tiny.clip_text_encoder(tokenizer, seed=2))
    ids = tokenizer(["a photo of the cat"], return_tensors="pt").input_ids
    before = [pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]]
    generator = torch.Generator().manual_seed(0)
    lora = {}
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for name, module in targets(encoder, ("q_proj",)):
            key = prefix + text_path(name).replace(".", "_")
            lora[key + ".lora_down.weight"], lora[key + ".lora_up.weight"] = lora_pair(module, generator)
    adapter = LoraAdapter(pipe)
    adapter.load_lora_weights(lora)
    assert sorted(adapter.get_list_adapters()) == ["text_encoder", "text_encoder_2"]
    after = [pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]]
    assert all(not torch.allclose(a, b) for a, b in zip(before, after))
    adapter.unload_lora_weights()
    assert all(torch.equal(a, e(ids)[0]) for a, e in zip(before, (pipe.text_encoder, pipe.text_encoder_2)))
