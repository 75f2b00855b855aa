"""The pipeline base class: model_index.json, component loading, from_pipe, .to(), Hub cache, per-call state."""

import json
import threading

import pytest
import torch

from diffloom import DiffusionPipeline, hookimpl
from diffloom.configuration import ConfigError
from diffloom.pipeline import PipelineError
from diffloom.registry import RegistryError, registry
from toy import ToyModel, ToyPipeline, ToyPlugin, ToyScheduler


@pytest.fixture(autouse=True)
def toy_plugin():
    name = registry.register_plugin(ToyPlugin(), "toy-test-plugin")
    yield
    registry.unregister_plugin(name)


@pytest.fixture
def pipe():
    torch.manual_seed(0)
    return ToyPipeline(ToyModel(), ToyScheduler(step_size=0.5))


@pytest.fixture
def folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "toy")
    return tmp_path / "toy"


def test_model_index_in_diffusers_format(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ToyPipeline" and "_diffusers_version" in index
    assert index["model"] == ["diffusers", "ToyModel"] and index["scheduler"] == ["diffusers", "ToyScheduler"]
    assert index["extra"] == [None, None] and index["flavour"] == "plain"
    assert (folder / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


def test_load_picks_the_class_from_the_index(pipe, folder):
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert type(loaded) is ToyPipeline and loaded.extra is None
    assert torch.equal(loaded.model.inp.weight, pipe.model.inp.weight)
    assert loaded.scheduler.config.step_size == 0.5
    torch.testing.assert_close(loaded(), pipe(), rtol=0, atol=1e-6)


def test_keyword_overrides_and_per_component_dtype(pipe, folder):
    other = ToyScheduler(step_size=2.0)
    loaded = ToyPipeline.from_pretrained(folder, scheduler=other, extra=ToyModel(),
                                         torch_dtype={"model": torch.float16, "default": torch.float32})
    assert loaded.scheduler is other and isinstance(loaded.extra, ToyModel)
    assert loaded.model.dtype == torch.float16
    assert ToyPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_components_from_pipe_and_to(pipe):
    assert set(pipe.components) == {"model", "scheduler", "extra", "flavour"}
    half_model = ToyModel().to(torch.float16)
    mixed = ToyPipeline(half_model, ToyScheduler())
    shared = ToyPipeline.from_pipe(mixed)
    assert shared.model is half_model and shared.model.dtype == torch.float16
    converted = ToyPipeline.from_pipe(pipe, torch_dtype=torch.float16)
    assert converted.model is pipe.model and pipe.model.dtype == torch.float16
    pipe.to(torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"


def test_setting_a_component_updates_the_index(pipe, tmp_path):
    pipe.extra = ToyModel()
    assert pipe.config["extra"] == ["diffusers", "ToyModel"]
    pipe.save_pretrained(tmp_path / "p")
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path / "p").extra, ToyModel)


def test_bad_folders_are_named(folder, tmp_path):
    with pytest.raises(OSError, match="not a folder"):
        DiffusionPipeline.from_pretrained(tmp_path / "missing" / "x")
    index = folder / "model_index.json"
    good = index.read_text()
    index.write_text("{")
    with pytest.raises(ConfigError, match="model_index.json is not valid JSON"):
        DiffusionPipeline.from_pretrained(folder)
    index.write_text(json.dumps({**json.loads(good), "_class_name": "ToyPipelin"}))
    with pytest.raises(RegistryError, match="model_index.json.*ToyPipelin.*did you mean ToyPipeline"):
        DiffusionPipeline.from_pretrained(folder)
    data = json.loads(good)
    del data["model"]
    index.write_text(json.dumps(data))
    with pytest.raises(PipelineError, match="model_index.json lists no component 'model'"):
        DiffusionPipeline.from_pretrained(folder)
    data["model"] = ["diffusers", "NoSuchModel"]
    index.write_text(json.dumps(data))
    with pytest.raises(RegistryError, match="entry 'model'.*NoSuchModel"):
        DiffusionPipeline.from_pretrained(folder)
    index.write_text(good)
    with pytest.raises(TypeError, match="unexpected arguments \\['colour'\\]"):
        DiffusionPipeline.from_pretrained(folder, colour=1)


def test_hub_repo_from_a_cache_folder_offline(folder, tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache layout, with the network switched off."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--toy"
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded = DiffusionPipeline.from_pretrained("someone/toy", cache_dir=tmp_path / "hub")
    assert type(loaded) is ToyPipeline and loaded.config["_name_or_path"] == "someone/toy"
    with pytest.raises(OSError, match="someone/other"):
        DiffusionPipeline.from_pretrained("someone/other", cache_dir=tmp_path / "hub")


def test_call_state_is_per_call_and_per_thread(pipe):
    seen = {}

    def remember(p, i, t, kwargs):
        seen.setdefault(threading.current_thread().name, []).append((i, p.num_timesteps))
        return kwargs

    outs = {}

    def run(n):
        outs[n] = pipe(steps=n, callback_on_step_end=remember)

    threads = [threading.Thread(target=run, args=(n,)) for n in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in (2, 3, 4, 5):
        assert torch.equal(outs[n], pipe(steps=n))
    assert sorted(len(v) for v in seen.values()) == [2, 3, 4, 5]
    assert all(n == len(v) for v in seen.values() for _, n in v)
    assert pipe.scheduler.timesteps is None  # the shared scheduler was never stepped


def test_callback_tensor_inputs_are_checked(pipe):
    with pytest.raises(ValueError, match="names \\['noise'\\].*allowed: \\['latents', 'cond'\\]"):
        pipe(callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs=["noise"])


def test_hooks_given_per_call_do_not_stay(pipe):
    calls = []

    class Counter:
        @hookimpl
        def on_step_begin(self, pipe, call, step):
            calls.append(step.index)

    pipe(hooks=[Counter()])
    pipe()
    assert calls == [0, 1, 2]
    pipe.hooks.append(Counter())
    pipe()
    assert calls == [0, 1, 2, 0, 1, 2]


def test_adapter_methods_are_delegated_to_the_adapter_plugin(pipe, monkeypatch):
    entries = registry.entries
    with monkeypatch.context() as m:  # as if no adapter plugin were installed
        m.setattr(registry, "entries", lambda kind: [] if kind == "adapter" else entries(kind))
        with pytest.raises(AttributeError, match="load_lora_weights is provided by an adapter plugin"):
            pipe.load_lora_weights("x")

    class Counting:
        def __init__(self, pipeline):
            self.pipeline = pipeline
            self.loaded = []

        def count_me(self, path):
            self.loaded.append(path)
            return self.pipeline

    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register("counting", Counting, methods=["count_me"])

    name = registry.register_plugin(Plugin(), "counting-adapter")
    try:
        assert pipe.count_me("a") is pipe
        shared = ToyPipeline.from_pipe(pipe)
        shared.count_me("b")
        assert pipe._adapters["counting"].loaded == ["a", "b"]
    finally:
        registry.unregister_plugin(name)
    with pytest.raises(AttributeError, match="no_such_method"):
        pipe.no_such_method  # noqa: B018
