"""LoRA and textual inversion parity sweep against diffusers + PEFT: the key spellings diffusers reads, skips and
refuses, DoRA, PEFT metadata in safetensors files, SDXL's original (SGM) UNet names in kohya files, each model's own
active adapters, per-block weights over resnets, fusing corners, hotswap, save_lora_weights, float16, and
textual-inversion argument corners. Every LoRA is built here from seeded random weights."""

import contextlib
import copy
import re

import diffusers
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import save_file

import tiny
from diffloom import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffloom_adapters.lora import LoraAdapter
from test_adapters_lora import TEXT_TARGETS, UNET_TARGETS, lora_pair, max_diff, run, targets, text_path

TOL = 1e-5
CONVS = ("conv2", "conv_shortcut", "downsamplers.0.conv", "conv_in", "conv_out", "time_embedding.linear_1")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ours(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd(ours, tiny_sd_path):
    """Ours (shared; after each test unloaded and its weights put back, as a test may bake a LoRA in) and a fresh
    diffusers pipeline."""
    weights = {name: p.detach().clone() for name, p in [*ours.unet.named_parameters(),
                                                          *ours.text_encoder.named_parameters()]}
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref.set_progress_bar_config(disable=True)
    yield ours, ref
    ours.unload_lora_weights()
    ours.unload_textual_inversion()
    with torch.no_grad():
        for name, p in [*ours.unet.named_parameters(), *ours.text_encoder.named_parameters()]:
            p.copy_(weights[name])


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    return tiny.save_sdxl_folder(tmp_path_factory.mktemp("tiny-sdxl-lora") / "pipe")


@pytest.fixture
def sdxl(sdxl_path):
    pipes = StableDiffusionXLPipeline.from_pretrained(sdxl_path), diffusers.StableDiffusionXLPipeline.from_pretrained(
        sdxl_path)
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def lora(pipe, seed, components=("unet", "text_encoder"), rank=2, unet_targets=UNET_TARGETS):
    """A PEFT-format LoRA of ``components`` (text encoder keys in the transformers 4 layout, as files have them)."""
    generator = torch.Generator().manual_seed(seed)
    sd = {}
    for component in components:
        model = getattr(pipe, component)
        names = unet_targets if component == "unet" else TEXT_TARGETS
        for name, module in targets(model, names):
            name = name if component == "unet" else text_path(name)
            down, up = lora_pair(module, generator)
            if rank != 2:
                down, up = torch.cat([down] * rank)[:rank], torch.cat([up] * rank, 1)[:, :rank].contiguous()
            sd[f"{component}.{name}.lora_A.weight"], sd[f"{component}.{name}.lora_B.weight"] = down, up
    return sd


def load(pipes, source, **kwargs):
    """Load into each pipeline its own copy (diffusers may swap a caller's tensors)."""
    for pipe in pipes:
        pipe.load_lora_weights(copy.deepcopy(source) if isinstance(source, dict) else source, **kwargs)


def both(pipes, method, *args, **kwargs):
    for pipe in pipes:
        getattr(pipe, method)(*args, **kwargs)


def same(pipes, tol=TOL, **kwargs):
    a, b = (run(pipe, **kwargs) for pipe in pipes)
    assert max_diff(a, b) <= tol
    return a


def module_of(pipe, key):
    component, _, name = key.partition(".")
    model = getattr(pipe, component)
    name = re.sub(r"\.(lora_[AB]\.weight|lora_magnitude_vector)$", "", name)
    return model.get_submodule(name if hasattr(model, "text_model") else name.removeprefix("text_model."))


# -- key spellings ---------------------------------------------------------------------------------------------


def _old_attention_keys(sd, text):
    """The first diffusers spelling: ``attn1.to_q_lora.down.weight`` (UNet, without ``.processor``) and
    ``self_attn.to_q_lora.down.weight`` / ``mlp.fc1.lora_linear_layer.down.weight`` (text encoder)."""
    out = {}
    for key, value in sd.items():
        direction = "down" if ".lora_A." in key else "up"
        module = key.rsplit(".lora_", 1)[0]
        match = re.match(r"(.*)\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)$", module)
        if match and (text == key.startswith("text_encoder.")):
            projection = match.group(2).replace("to_", "").replace("_proj", "").replace(".0", "")
            out[f"{match.group(1)}.to_{projection}_lora.{direction}.weight"] = value
        elif text and key.startswith("text_encoder."):
            out[f"{module}.lora_linear_layer.{direction}.weight"] = value
        elif not text and key.startswith("unet."):
            out[f"{module}.lora.{direction}.weight"] = value
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("spelling", ["text_old", "unet_old", "lora_bias", "skipped_prefixes"])
def test_key_spellings_diffusers_reads(sd, spelling):
    ours, ref = sd
    base = run(ours)
    state_dict = lora(ours, 1)
    if spelling in ("text_old", "unet_old"):
        state_dict = _old_attention_keys(state_dict, text=spelling == "text_old")
    elif spelling == "lora_bias":
        generator = torch.Generator().manual_seed(2)
        for key in [k for k in state_dict if k.endswith("lora_B.weight")]:
            state_dict[key.replace(".weight", ".bias")] = torch.randn(state_dict[key].shape[0], generator=generator)
    else:  # keys of no model this pipeline loads LoRA into: diffusers skips them, we warn and skip
        state_dict.update({"text_encoder_2." + k.partition(".")[2]: v for k, v in state_dict.items()
                           if k.startswith("text_encoder.")})
        state_dict["down_blocks.0.attentions.0.proj_in.lora_A.weight"] = torch.zeros(2, 8, 1, 1)
    with pytest.warns(UserWarning, match="not read") if spelling == "skipped_prefixes" else contextlib.nullcontext():
        load((ours, ref), state_dict)
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}
    assert max_diff(same((ours, ref)), base) > 1e-2
    if spelling == "lora_bias":  # fusing a lora_B bias needs a bias in the layer (attention q/k/v have none)
        for pipe in (ours, ref):
            with pytest.raises((ValueError, RuntimeError)):
                pipe.fuse_lora(components=["unet"])
        assert ours.get_list_adapters()["unet"] == ["default_0"] and max_diff(run(ours), base) > 1e-2


def _refused(case, pipe):
    state_dict = lora(pipe, 3)
    if case == "unet_lora_linear_layer":
        return {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                for k, v in state_dict.items() if k.startswith("unet.")}, "lora_linear_layer"
    if case == "peft_alpha":
        return {**state_dict, "unet.down_blocks.0.attentions.0.proj_in.alpha": torch.tensor(4.0)}, "no LoRA keys"
    if case == "kohya_loha":
        return {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 8),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8, 1, 1),
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2, 1, 1)}, "LoHa"
    key = "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"
    if case == "dora_with_bias":
        return {**state_dict, key: torch.ones(1, 8, 1, 1),
                key.replace("proj_in", "proj_out").replace("magnitude_vector", "B.bias"): torch.zeros(8)}, "DoRA"
    return {**state_dict, key: torch.ones(8)}, "magnitude"  # a conv layer's magnitude is (1, C, 1, 1)


@pytest.mark.parametrize("case", ["unet_lora_linear_layer", "peft_alpha", "kohya_loha", "dora_with_bias",
                                  "conv_magnitude_shape"])
def test_refused_like_diffusers(sd, case):
    ours, ref = sd
    state_dict, message = _refused(case, ours)
    with pytest.raises((ValueError, RuntimeError, IndexError)):  # diffusers' own errors, some unplanned
        ref.load_lora_weights(copy.deepcopy(state_dict))
    with pytest.raises(ValueError, match=message):
        ours.load_lora_weights(state_dict)
    assert ours.get_list_adapters() == {} and ours.get_active_adapters() == []


# -- kohya files with SDXL's original UNet names -----------------------------------------------------------------


def sgm_name(path, layers_per_block=1):
    """The kohya/SGM name of a diffusers UNet layer (``down_blocks.0.attentions.0.proj_in`` ->
    ``input_blocks_1_1_proj_in``)."""
    top = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding.linear_1": "time_embed_0",
           "add_embedding.linear_1": "label_emb_0_0"}
    if path in top:
        return top[path]
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    kind, block, inner, index, rest = re.match(r"(down|mid|up)_blocks?\.(\d*)\.?(\w+)\.(\d+)\.(.+)$", path).groups()
    rest = resnet.get(rest, rest) if inner == "resnets" else rest
    if inner == "downsamplers":
        return f"input_blocks_{1 + int(block) * (layers_per_block + 1) + layers_per_block}_0_op"
    which = 0 if inner == "resnets" else 1
    if kind == "mid":
        return f"middle_block_{(0, 2)[int(index)] if inner == 'resnets' else 1}_{rest.replace('.', '_')}"
    if kind == "down":
        return f"input_blocks_{1 + int(block) * (layers_per_block + 1) + int(index)}_{which}_{rest.replace('.', '_')}"
    return f"output_blocks_{int(block) * (layers_per_block + 1) + int(index)}_{which}_{rest.replace('.', '_')}"


def test_kohya_sdxl_sgm_names_dora_scale_and_both_text_encoders(sdxl):
    ours, ref = sdxl
    base = run(ours)
    generator = torch.Generator().manual_seed(4)
    state_dict = {}
    for prefix, model, names, rename in (
            ("lora_unet_", ours.unet, UNET_TARGETS + CONVS + ("add_embedding.linear_1",), sgm_name),
            ("lora_te1_", ours.text_encoder, TEXT_TARGETS, lambda n: text_path(n).replace(".", "_")),
            ("lora_te2_", ours.text_encoder_2, TEXT_TARGETS, lambda n: text_path(n).replace(".", "_"))):
        for name, module in targets(model, names):
            key = prefix + rename(name)
            state_dict[key + ".lora_down.weight"], state_dict[key + ".lora_up.weight"] = lora_pair(module, generator)
            state_dict[key + ".alpha"] = torch.tensor(1.0)
            state_dict[key + ".dora_scale"] = torch.ones(1)  # kohya DoRA: dropped by diffusers
    with pytest.warns(UserWarning, match="dora_scale"):
        load((ours, ref), state_dict)
    assert ours.get_list_adapters() == ref.get_list_adapters()
    assert max_diff(same((ours, ref)), base) > 1e-2
    same((ours, ref), cross_attention_kwargs={"scale": 0.4})  # the call scale reaches both text encoders
    both((ours, ref), "unload_lora_weights")

    # A file mixing both UNet namings: diffusers keeps the diffusers-named layers only. A diffusers-named
    # add_embedding layer is one diffusers cannot convert back, so it is skipped too.
    extra = {}
    for name, module in targets(ours.unet, ("attn1.to_q", "add_embedding.linear_2")):
        key = "lora_unet_" + name.replace(".", "_")
        extra[key + ".lora_down.weight"], extra[key + ".lora_up.weight"] = lora_pair(module, generator)
    mixed = {k: v for k, v in state_dict.items() if "dora_scale" not in k and k.startswith("lora_unet_")}
    with pytest.warns(UserWarning, match="not read"):
        load((ours, ref), {**mixed, **extra}, adapter_name="mixed")
    same((ours, ref))


# -- DoRA, PEFT metadata, file names -----------------------------------------------------------------------------


def test_dora_fused_and_scaled(sd):
    ours, ref = sd
    state_dict = lora(ours, 5, unet_targets=UNET_TARGETS + ("conv2",))
    generator = torch.Generator().manual_seed(6)
    for key in [k for k in state_dict if k.endswith("lora_A.weight")]:
        weight = module_of(ours, key).weight.detach()
        norm = weight.flatten(1).norm(dim=1) * (1 + 0.3 * torch.rand(weight.shape[0], generator=generator))
        state_dict[key.replace("lora_A.weight", "lora_magnitude_vector")] = \
            norm.reshape(1, -1, 1, 1) if weight.ndim == 4 else norm
    # diffusers does not read the text encoder's magnitudes (transformers drops them); we follow, with a warning
    with pytest.warns(UserWarning, match="text_encoder.*lora_magnitude_vector"):
        load((ours, ref), state_dict, adapter_name="dora")
    load((ours, ref), lora(ours, 7), adapter_name="plain")
    both((ours, ref), "set_adapters", ["plain", "dora"], [0.5, 0.8])
    same((ours, ref))
    same((ours, ref), cross_attention_kwargs={"scale": 0.5})
    both((ours, ref), "fuse_lora")
    same((ours, ref))
    both((ours, ref), "unfuse_lora")
    # last: after a call at scale 0, diffusers forgets the set_adapters weights (diffloom keeps them)
    same((ours, ref), cross_attention_kwargs={"scale": 0.0})  # DoRA still rescales the weight rows


def test_peft_metadata_and_guessed_file_name(sd, tmp_path):
    """Files diffusers' save_lora_weights writes with each model's LoraConfig: rank/alpha patterns, rsLoRA."""
    ours, ref = sd
    state_dict = lora(ours, 8)
    state_dict.update({k: v for k, v in lora(ours, 9, rank=3).items() if ".proj_in." in k})
    unet = {k.partition(".")[2]: v for k, v in state_dict.items() if k.startswith("unet.")}
    text = {k.partition(".")[2]: v for k, v in state_dict.items() if k.startswith("text_encoder.")}
    unet_config = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
                             rank_pattern={"proj_in": 3}, alpha_pattern={"proj_in": 6, "ff.net.2": 1}).to_dict()
    text_config = LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "fc1"]).to_dict()
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "meta", unet_lora_layers=unet,
                                                        text_encoder_lora_layers=text,
                                                        unet_lora_adapter_metadata=unet_config,
                                                        text_encoder_lora_adapter_metadata=text_config)
    load((ours, ref), tmp_path / "meta", adapter_name="meta")
    same((ours, ref))
    # A folder whose file has its own name: its .safetensors file is read before the default .bin name.
    folder = tmp_path / "named"
    folder.mkdir()
    save_file(lora(ours, 10), str(folder / "my_style.safetensors"))
    save_file({"x": torch.zeros(1)}, str(folder / "optimizer.safetensors"))
    torch.save(lora(ours, 11), folder / "pytorch_lora_weights.bin")
    load((ours, ref), folder, adapter_name="named")
    same((ours, ref))
    # metadata without a config for a model that has layers: diffusers (PEFT) cannot build it
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "partial", unet_lora_layers=unet,
                                                        text_encoder_lora_layers=text,
                                                        unet_lora_adapter_metadata=unet_config)
    with pytest.raises(ValueError):
        ref.load_lora_weights(tmp_path / "partial", adapter_name="partial")
    with pytest.raises(ValueError, match="text_encoder_lora_adapter_metadata"):
        ours.load_lora_weights(tmp_path / "partial", adapter_name="partial")


# -- adapters per model, block weights, fusing -------------------------------------------------------------------


def test_each_model_keeps_its_active_adapters_and_block_weights_reach_resnets(sd):
    ours, ref = sd
    load((ours, ref), lora(ours, 12), adapter_name="first")
    load((ours, ref), lora(ours, 13, components=("unet",)), adapter_name="second")  # the text encoder keeps "first"
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["first"]
    same((ours, ref))
    weights = [{"unet": {"down": 0.2, "mid": [0.6], "up": {"block_1": [0.5, 0.1]}}, "text_encoder": 0.3},
               {"unet": {"up": 0.4}}]
    both((ours, ref), "set_adapters", ["first", "second"], weights)  # resnets take their block's weight
    same((ours, ref))
    both((ours, ref), "delete_adapters", ["first", "not-loaded"])
    assert ours.get_active_adapters() == ref.get_active_adapters()
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"unet": ["second"]}
    same((ours, ref))
    load((ours, ref), lora(ours, 14, components=("unet",), unet_targets=("conv_in",)), adapter_name="outside")
    for pipe in (ours, ref):  # diffusers cannot spread block weights over layers outside the blocks
        with pytest.raises((ValueError, IndexError)):
            pipe.set_adapters("second", {"unet": {"down": 0.5}})


def test_fusing_corners(sd):
    ours, ref = sd
    pipes = ours, ref
    load(pipes, lora(ours, 15), adapter_name="first")
    load(pipes, lora(ours, 16, rank=3), adapter_name="second")
    both(pipes, "set_adapters", ["first", "second"], [0.6, 0.8])
    both(pipes, "fuse_lora", adapter_names=["first"])  # layers holding a fused update run as plain layers
    same(pipes)
    both(pipes, "disable_lora")  # takes fused updates out of the weights
    same(pipes)
    both(pipes, "enable_lora")
    same(pipes)
    both(pipes, "fuse_lora")
    load(pipes, lora(ours, 17), adapter_name="third")  # loading into a model unfuses it
    same(pipes)
    both(pipes, "fuse_lora", components=["unet"])
    both(pipes, "delete_adapters", "third")  # fused, then deleted: stays in the weights, even after unfusing
    same(pipes)
    both(pipes, "unfuse_lora")
    same(pipes)
    for pipe in pipes:
        for components in (["vae"], ["text_encoder_2"], []):
            with pytest.raises(ValueError):
                pipe.fuse_lora(components=components)


def hooked_layers(pipe) -> int:
    return sum(bool(m._forward_hooks) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules())


def test_fused_or_disabled_lora_leaves_plain_layers(sd, tmp_path):
    # Plain layers (no torch hooks) are what the GPU fast path's CUDA graphs can replay.
    ours, ref = sd
    pipes = ours, ref
    load(pipes, lora(ours, 18), adapter_name="only")
    running = hooked_layers(ours)
    assert running > 0
    both(pipes, "fuse_lora")
    assert hooked_layers(ours) == 0
    same(pipes)
    both(pipes, "unfuse_lora")
    assert hooked_layers(ours) == running
    same(pipes)
    both(pipes, "disable_lora")
    assert hooked_layers(ours) == 0
    same(pipes)
    both(pipes, "enable_lora")
    assert hooked_layers(ours) == running
    same(pipes)
    ours.save_lora_weights(tmp_path, unet_lora_layers={"down_blocks.0.attentions.0.proj_in.lora_A.weight":
                                                           torch.zeros(2, 4)})
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()


def test_hotswap(sd):
    ours, ref = sd
    load((ours, ref), lora(ours, 18, components=("unet",)), adapter_name="first")
    load((ours, ref), lora(ours, 19), adapter_name="second")
    both((ours, ref), "set_adapters", ["first", "second"], [0.5, 0.7])
    swapped = {k: v for k, v in lora(ours, 20, components=("unet",), rank=3).items() if ".attentions." in k}
    load((ours, ref), swapped, adapter_name="first", hotswap=True)  # resets its weight, drops layers it lacks
    same((ours, ref))
    for pipe in (ours, ref):
        with pytest.raises(ValueError):
            pipe.load_lora_weights(lora(ours, 21), adapter_name="second", hotswap=True)  # text encoder keys
        with pytest.raises(ValueError):
            pipe.load_lora_weights(lora(ours, 21, components=("unet",)), adapter_name="nope", hotswap=True)


# -- saving, float16 ---------------------------------------------------------------------------------------------


def test_save_lora_weights_writes_diffusers_bytes(sdxl, tmp_path):
    ours, ref = sdxl
    state_dict = lora(ours, 22, components=("unet", "text_encoder", "text_encoder_2"))
    layers = {f"{c}_lora_layers": {k.partition(".")[2]: v for k, v in state_dict.items() if k.startswith(c + ".")}
              for c in ("unet", "text_encoder", "text_encoder_2")}
    configs = {"unet_lora_adapter_metadata": LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"]).to_dict(),
               "text_encoder_lora_adapter_metadata": LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj"]).to_dict(),
               "text_encoder_2_lora_adapter_metadata": LoraConfig(r=2, lora_alpha=2, target_modules=["fc1"]).to_dict()}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(tmp_path / "ref", **layers, **copy.deepcopy(configs))
    LoraAdapter(ours).save_lora_weights(tmp_path / "ours", **layers, **configs)
    files = [safe_open(str(tmp_path / who / "pytorch_lora_weights.safetensors"), "pt") for who in ("ours", "ref")]
    assert files[0].metadata() == files[1].metadata()  # {"format": "pt", "lora_adapter_metadata": JSON}
    assert list(files[0].keys()) == list(files[1].keys()) == sorted(state_dict)
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in state_dict)
    load((ours, ref), tmp_path / "ours")
    same((ours, ref))
    with pytest.raises(ValueError, match="at least one"):
        LoraAdapter(ours).save_lora_weights(tmp_path / "none")
    with pytest.raises(ValueError, match="safetensors"):
        LoraAdapter(ours).save_lora_weights(tmp_path / "bin", unet_lora_layers=layers["unet_lora_layers"],
                                            safe_serialization=False, **configs)


def test_float16_kohya_blocks_and_fusing(tiny_sd_path):
    pipes = (StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16),
             diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(23)
    state_dict = {}
    for prefix, model, names, rename in (("lora_unet_", pipes[0].unet, UNET_TARGETS, str),
                                         ("lora_te_", pipes[0].text_encoder, TEXT_TARGETS, text_path)):
        for name, module in targets(model, names):
            key = prefix + rename(name).replace(".", "_")
            down, up = lora_pair(module, generator)
            state_dict[key + ".lora_down.weight"], state_dict[key + ".lora_up.weight"] = down.half(), up.half()
            state_dict[key + ".alpha"] = torch.tensor(1.0, dtype=torch.float16)
    load(pipes, state_dict)
    same(pipes, tol=1e-3)
    both(pipes, "set_adapters", "default_0", {"unet": {"down": 0.4, "up": {"block_1": [0.2, 0.9]}}})
    same(pipes, tol=1e-3, cross_attention_kwargs={"scale": 0.6})
    both(pipes, "fuse_lora", lora_scale=0.7)
    same(pipes, tol=1e-3)


# -- textual inversion -------------------------------------------------------------------------------------------


def test_textual_inversion_argument_corners(sd, tmp_path):
    ours, ref = sd

    def vectors(n, seed):
        return torch.randn(n, tiny.TEXT_HIDDEN, generator=torch.Generator().manual_seed(seed))

    save_file({"<file>": vectors(2, 1)}, str(tmp_path / "learned_embeds.safetensors"))

    def each(*args, **kwargs):
        for pipe in (ours, ref):
            pipe.load_textual_inversion(*args, **kwargs)

    with pytest.warns(UserWarning, match="unused"):  # one embedding, several tokens: diffusers uses the first
        each({"<one>": vectors(1, 2)}, token=["<one>", "<two>"])
    each(tmp_path, use_safetensors=True, hf_token=None, revision=None)
    each([vectors(3, 3)[None].transpose(0, 1), {"<a1111>": vectors(1, 4)}], token=["<stack>", None])  # (3, 1, dim)
    assert ours.tokenizer.get_added_vocab() == ref.tokenizer.get_added_vocab()
    prompt = "<file> and <one> with <stack> and <a1111>"
    same((ours, ref), prompt=prompt)
    both((ours, ref), "unload_textual_inversion", ["<one>", "<never-loaded>"])  # removes what it finds
    same((ours, ref), prompt=prompt)
    for args, kwargs, message in (
            (([{"<x>": vectors(1, 5)}, {"<y>": vectors(1, 6)}],), {"token": ["<z>", "<z>"]}, "twice"),
            (([{"<x>": vectors(1, 5)}, {"<y>": vectors(1, 6)}],), {"token": "<z>"}, "2 embeddings but 1"),
            (({"<x>": vectors(2, 7)[None]},), {}, "shape"),
            (({"string_to_param": {"*": vectors(1, 8)}, "step": 1},), {"token": "<x>"}, "'name'")):
        with pytest.raises((ValueError, RuntimeError, KeyError)):
            ref.load_textual_inversion(*args, **kwargs)
        with pytest.raises(ValueError, match=message):
            ours.load_textual_inversion(*args, **kwargs)
    with pytest.raises(ValueError, match="not loaded"):
        ours.unload_textual_inversion(["<never-loaded>"])
