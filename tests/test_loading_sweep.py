"""Loading and saving against diffusers: variants, shards, dtypes, device maps, missing components, from_pipe,
AutoPipelines and Hub downloads.

Each case loads (or saves) the same tiny folder with both libraries and compares what comes out: classes,
configs, file names, dtypes and weights, images, or the kind of error raised.
"""

import json
import shutil
import sys

import diffusers
import numpy as np
import pytest
import torch

import diffloom
import tiny
from diffloom import (AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline, PNDMScheduler,
                      StableDiffusionPipeline, UNet2DConditionModel)
from diffloom.modeling import WeightsError
from diffloom.pipeline import PipelineError
from diffloom.registry import RegistryError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BOOKKEEPING = ("_diffusers_version", "_name_or_path", "_use_default_values")


def weights(pipe) -> dict:
    """Every model component's state dict, by component name."""
    return {name: module.state_dict() for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}


def assert_same_weights(ours, ref):
    a, b = weights(ours), weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key, value in a[name].items():
            assert value.dtype == b[name][key].dtype, f"{name}.{key}: {value.dtype} vs {b[name][key].dtype}"
            assert torch.equal(value, b[name][key]), f"{name}.{key}"


def plain(config) -> dict:
    """A config without where it came from and which version wrote it; tuples as JSON lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k not in BOOKKEEPING}


def images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of the red cat", num_inference_steps=2, height=tiny.IMAGE_HEIGHT, width=tiny.IMAGE_WIDTH,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def ref(tiny_sd_path):
    return diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)


@pytest.fixture(scope="module")
def layouts(tiny_sd_path, tmp_path_factory):
    """Folders diffusers wrote: fp16 in shards (diffusers' shard names); fp32 plus an fp16 UNet; only fp16 files."""
    root = tmp_path_factory.mktemp("layouts")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.save_pretrained(root / "sharded-fp16", variant="fp16", max_shard_size="20KB")
    shutil.copytree(tiny_sd_path, root / "unet-fp16")
    pipe.unet.to(torch.float16).save_pretrained(root / "unet-fp16" / "unet", variant="fp16")
    pipe.to(torch.float16).save_pretrained(root / "fp16-only", variant="fp16")
    return root


# -- variants, shards and dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,kwargs", [
    ("fp16-only", {}),
    ("fp16-only", {"torch_dtype": {"unet": torch.float16}}),  # unnamed components load in float32, as in diffusers
    ("unet-fp16", {}),  # the other components have no fp16 files: loaded as they are, without a warning
    ("unet-fp16", {"dtype": torch.float16}),
    ("sharded-fp16", {}),
])
def test_variant_loads_like_diffusers(layouts, layout, kwargs, recwarn):
    ours = DiffusionPipeline.from_pretrained(layouts / layout, variant="fp16", **kwargs)
    ref_kwargs = {("torch_dtype" if k == "dtype" else k): v for k, v in kwargs.items()}
    theirs = diffusers.DiffusionPipeline.from_pretrained(layouts / layout, variant="fp16", **ref_kwargs)
    assert type(ours).__name__ == type(theirs).__name__
    assert_same_weights(ours, theirs)
    assert not [w for w in recwarn if "variant" in str(w.message)]
    if layout == "unet-fp16" and not kwargs:
        assert np.abs(images(ours) - images(theirs)).max() <= 1e-4


def test_variant_errors_name_the_fix(layouts, tiny_sd_path):
    with pytest.raises(PipelineError, match="holds 'fp16' weights.*drop variant='fp16'"):
        DiffusionPipeline.from_pretrained(tiny_sd_path, variant="fp16")
    with pytest.raises(ValueError, match="variant=fp16"):
        diffusers.DiffusionPipeline.from_pretrained(tiny_sd_path, variant="fp16")
    with pytest.raises(WeightsError, match="holds the variant\\(s\\) fp16: pass variant='fp16'"):
        UNet2DConditionModel.from_pretrained(layouts / "fp16-only", subfolder="unet")
    with pytest.raises(ValueError, match="dtype or torch_dtype, not both"):
        DiffusionPipeline.from_pretrained(tiny_sd_path, dtype=torch.float16, torch_dtype=torch.float16)


def test_saved_shards_and_variants_follow_diffusers(ref, tiny_sd_path, tmp_path):
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ours.save_pretrained(tmp_path / "ours", variant="fp16", max_shard_size="20KB")
    ref.save_pretrained(tmp_path / "ref", variant="fp16", max_shard_size="20KB")
    unet = sorted(p.name for p in (tmp_path / "ours" / "unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in unet
    assert all(n.startswith("diffusion_pytorch_model.fp16-0") for n in unet if n.endswith(".safetensors"))
    index_path = tmp_path / "ours" / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json"
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in ours.unet.state_dict().values())
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        a, b = (json.loads((tmp_path / side / name).read_text()) for side in ("ours", "ref"))
        assert plain(a) == plain(b)
    assert_same_weights(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16"), ref)
    # Saved again unsharded, the shards and their index go: a loader must not find stale ones.
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    assert sorted(p.name for p in (tmp_path / "ours" / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(NotImplementedError, match="upload_folder"):
        ours.save_pretrained(tmp_path / "x", push_to_hub=True)


def test_model_loading_arguments(tiny_sd_path, tmp_path):
    ours, info = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet", dtype=torch.bfloat16,
                                                      device_map={"": "cpu"}, low_cpu_mem_usage=False,
                                                      output_loading_info=True)
    theirs, ref_info = diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet",
                                                                      dtype=torch.bfloat16, device_map="cpu",
                                                                      output_loading_info=True)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and info == ref_info
    assert ours.config._name_or_path == str(tiny_sd_path)
    ours.save_pretrained(tmp_path / "unet")
    assert "_name_or_path" not in json.loads((tmp_path / "unet" / "config.json").read_text())
    with pytest.raises(NotImplementedError, match="one device"):
        UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet", device_map={"conv_in": "cpu"})
    with pytest.raises(ValueError, match="names no device of this machine"):
        UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet", device_map="bogus")


# -- pipeline arguments -----------------------------------------------------------------------------------------


def test_pipeline_device_map(tiny_sd_path, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    for device_map in ("cpu", "balanced"):  # without an accelerator, "balanced" leaves everything on the CPU
        pipe = DiffusionPipeline.from_pretrained(tiny_sd_path, device_map=device_map, low_cpu_mem_usage=True)
        assert pipe.device.type == "cpu"
    for device_map, error in (("auto", NotImplementedError), ({"": "cpu"}, ValueError)):
        with pytest.raises(error):
            diffusers.DiffusionPipeline.from_pretrained(tiny_sd_path, device_map=device_map)
        with pytest.raises(error, match="device_map"):
            DiffusionPipeline.from_pretrained(tiny_sd_path, device_map=device_map)


def test_null_and_absent_components(tiny_sd_path, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": [None, None]}))
    with pytest.raises(ValueError, match="expected"):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    with pytest.raises(PipelineError, match=r"\[null, null\] the component 'unet'.*pass unet=\.\.\."):
        DiffusionPipeline.from_pretrained(folder)
    # An optional component the index does not list at all is None, in both libraries.
    del index["safety_checker"]
    (folder / "model_index.json").write_text(json.dumps(index))
    ours, theirs = DiffusionPipeline.from_pretrained(folder), diffusers.DiffusionPipeline.from_pretrained(folder)
    assert ours.safety_checker is None and theirs.safety_checker is None


def test_an_index_naming_a_module_does_not_import_it(tiny_sd_path, tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sneaky_components.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    folder = tmp_path / "sd"
    shutil.copytree(tiny_sd_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["sneaky_components", "SneakyUNet"]}))
    with pytest.raises(RegistryError, match="does not make diffloom import it"):
        DiffusionPipeline.from_pretrained(folder)
    assert "sneaky_components" not in sys.modules


def test_dtype_device_and_to_follow_diffusers(ref, tiny_sd_path):
    ours = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ours.vae.to(torch.float16)  # an SD pipeline reports its text encoder's dtype, not its (upcast) VAE's
    ref.vae.to(torch.float16)
    try:
        assert ours.dtype == ref.dtype == torch.float32 and ours.device == ref.device
    finally:
        ref.vae.to(torch.float32)
    assert ours.name_or_path == str(tiny_sd_path)
    with pytest.raises(ValueError, match="at most a device and a dtype"):
        ours.to("cpu", torch.float32, 3)
    with pytest.raises(ValueError, match="dtype was given twice"):
        ours.to(torch.float16, dtype=torch.float32)


def test_load_config_returns_unused_arguments(tiny_sd_path):
    ours = PNDMScheduler.load_config(tiny_sd_path, subfolder="scheduler", return_unused_kwargs=True, foo=1)
    theirs = diffusers.PNDMScheduler.load_config(tiny_sd_path, subfolder="scheduler", return_unused_kwargs=True,
                                                 foo=1)
    assert ours == theirs
    with pytest.raises(TypeError, match="unexpected arguments \\['foo'\\]"):
        PNDMScheduler.load_config(tiny_sd_path, subfolder="scheduler", foo=1)


# -- from_pipe and AutoPipelines --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refiner_path(tmp_path_factory):
    return tiny.save_sdxl_folder(tmp_path_factory.mktemp("refiner") / "pipe", refiner=True)


def test_from_pipe_keeps_settings_the_target_does_not_take(refiner_path):
    """The refiner's requires_aesthetics_score goes aside in the text-to-image pipeline and comes back."""
    chains = []
    for lib in (diffloom, diffusers):
        refiner = lib.AutoPipelineForImage2Image.from_pretrained(refiner_path)
        text2image = lib.AutoPipelineForText2Image.from_pipe(refiner)
        chains.append([refiner, text2image, lib.AutoPipelineForImage2Image.from_pipe(text2image)])
    for ours, theirs in zip(*chains):
        assert type(ours).__name__ == type(theirs).__name__ and plain(ours.config) == plain(theirs.config)
    assert chains[0][1].config["_requires_aesthetics_score"] is True
    assert chains[0][2].config["requires_aesthetics_score"] is True


def test_auto_pipelines_with_controlnet(tmp_path):
    path = tiny.save_sd_controlnet_folder(tmp_path / "cn")
    ours, theirs = DiffusionPipeline.from_pretrained(path), diffusers.DiffusionPipeline.from_pretrained(path)
    without = AutoPipelineForText2Image.from_pipe(ours, controlnet=None)
    ref_without = diffusers.AutoPipelineForText2Image.from_pipe(theirs, controlnet=None)
    assert type(without) is StableDiffusionPipeline and plain(without.config) == plain(ref_without.config)
    assert without.config["_controlnet"] == ["diffusers", "ControlNetModel"]
    back = AutoPipelineForText2Image.from_pipe(without, controlnet=ours.controlnet)
    assert type(back).__name__ == "StableDiffusionControlNetPipeline" and back.controlnet is ours.controlnet
    i2i, ref_i2i = AutoPipelineForImage2Image.from_pipe(ours), diffusers.AutoPipelineForImage2Image.from_pipe(theirs)
    assert type(i2i).__name__ == type(ref_i2i).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    with pytest.raises(ValueError, match="DDPMPipeline.*family"):
        AutoPipelineForText2Image.from_pipe(diffloom.DDPMPipeline(unet=ours.unet, scheduler=ours.scheduler))


# -- the Hub ----------------------------------------------------------------------------------------------------


def test_hub_download_takes_one_copy_of_each_component(layouts, tmp_path, monkeypatch):
    """A repo holding fp32 and fp16 weights, in safetensors and pickle: only the files loading reads come down."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--sd"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(layouts / "unet-fp16", snapshot)
    torch.save({}, snapshot / "unet" / "diffusion_pytorch_model.bin")
    torch.save({}, snapshot / "unet" / "diffusion_pytorch_model.fp16.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fetched = []
    original = huggingface_hub.snapshot_download

    def recording(*args, allow_patterns=None, **kwargs):
        fetched.append(allow_patterns)
        return original(*args, allow_patterns=allow_patterns, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    pipe = DiffusionPipeline.from_pretrained("someone/sd", cache_dir=tmp_path / "hub", variant="fp16",
                                             vae=diffloom.AutoencoderKL.from_pretrained(layouts / "unet-fp16/vae"))
    weight_files = sorted(f for f in fetched[-1] if f.endswith((".safetensors", ".bin")))
    assert weight_files == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert "model_index.json" in fetched[-1] and pipe.unet.dtype == torch.float32
