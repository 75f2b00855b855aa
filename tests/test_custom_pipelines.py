"""custom_pipeline=: community names, installed plugins, local files, Hub repos, repo modules, and the refusals."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffloom import DiffusionPipeline, hookimpl
from diffloom.hub import LoadError
from diffloom.registry import RegistryError
from diffloom.remote_code import CustomPipelineError, RemoteCodeRefused, load_pipeline_file, origin_of

pytest_plugins = ["pytester"]

REPO_ROOT = Path(__file__).resolve().parents[1]

TAGGED = '''
import pathlib

from diffloom import DiffusionPipeline

TAG = {tag!r}
MARKER = {marker!r}
if MARKER:
    pathlib.Path(MARKER).write_text("this file ran")


class TaggedPipeline(DiffusionPipeline):
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def __call__(self):
        return TAG
'''


def write_pipeline(folder, tag, marker="", name="pipeline.py") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(TAGGED.format(tag=tag, marker=str(marker)))
    return path


@pytest.fixture
def ddpm(tiny_ddpm_folder):
    return tiny_ddpm_folder


@pytest.fixture(autouse=True)
def remote_code_allowed(monkeypatch):
    monkeypatch.delenv("DIFFLOOM_DISABLE_REMOTE_CODE", raising=False)


# -- the user's own pipeline class and the shipped community pipeline ----------------------------------------


class UnetSchedulerOneForwardPipeline(DiffusionPipeline):  # as USER-STORIES.md writes it
    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def __call__(self):
        image = torch.randn(1, self.unet.config.in_channels, self.unet.config.sample_size,
                            self.unet.config.sample_size)
        out = self.unet(image, 1).sample
        return self.scheduler.step(out, 1, image).prev_sample


def test_user_story_subclass_loads_a_ddpm_folder(ddpm):
    pipe = UnetSchedulerOneForwardPipeline.from_pretrained(ddpm)
    assert type(pipe).__name__ == "UnetSchedulerOneForwardPipeline"
    with torch.no_grad():
        assert pipe().shape == (1, 3, 8, 8)


def test_community_name_works_offline_without_trust_and_matches_diffusers(ddpm):
    import diffusers

    pipe = DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="one_step_unet")
    assert type(pipe).__module__ == "diffloom_contrib.one_step_unet" and origin_of(type(pipe)) is None
    by_class_name = DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="UnetSchedulerOneForwardPipeline")
    assert type(by_class_name) is type(pipe)
    out = pipe(generator=torch.Generator().manual_seed(0))
    # The same computation with diffusers' UNet and scheduler read from the same folder.
    unet = diffusers.UNet2DModel.from_pretrained(ddpm, subfolder="unet")
    scheduler = diffusers.DDPMScheduler.from_pretrained(ddpm, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    image = torch.randn((1, 3, 8, 8), generator=generator)
    with torch.no_grad():
        expected = scheduler.step(unet(image, 1).sample, 1, image, generator=generator).prev_sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# -- local files -----------------------------------------------------------------------------------------------


def test_local_folder_and_file_need_trust_and_run_once(ddpm, tmp_path):
    marker = tmp_path / "ran"
    path = write_pipeline(tmp_path / "mine", "local", marker)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    for target in (tmp_path / "mine", path):
        with pytest.raises(RemoteCodeRefused) as refused:
            DiffusionPipeline.from_pretrained(ddpm, custom_pipeline=str(target))
        message = str(refused.value)
        assert str(path) in message and sha in message and "trust_remote_code=True" in message
    assert not marker.exists()  # refused code never ran

    pipe = DiffusionPipeline.from_pretrained(ddpm, custom_pipeline=str(tmp_path / "mine"), trust_remote_code=True)
    assert pipe() == "local" and type(pipe).__module__ == f"diffloom_remote.pipeline_{sha[:16]}"
    assert origin_of(type(pipe)).sha256 == sha and origin_of(type(pipe)).commit is None
    marker.unlink()
    again = DiffusionPipeline.from_pretrained(ddpm, custom_pipeline=str(path), trust_remote_code=True)
    assert type(again) is type(pipe) and not marker.exists()  # same content: the module is reused


def test_two_local_pipeline_files_do_not_overwrite_each_other(tmp_path):
    first = load_pipeline_file(write_pipeline(tmp_path / "a", "first"), trust_remote_code=True)
    second = load_pipeline_file(write_pipeline(tmp_path / "b", "second"), trust_remote_code=True)
    assert first.__name__ == second.__name__ == "TaggedPipeline" and first is not second
    assert first.__module__ != second.__module__
    assert sys.modules[first.__module__].TAG == "first" and sys.modules[second.__module__].TAG == "second"
    assert first.__call__(None) == "first" and second.__call__(None) == "second"


def test_kill_switch_refuses_even_trusted_code(ddpm, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    write_pipeline(tmp_path / "mine", "local", marker)
    monkeypatch.setenv("DIFFLOOM_DISABLE_REMOTE_CODE", "1")
    with pytest.raises(RemoteCodeRefused, match="DIFFLOOM_DISABLE_REMOTE_CODE=1 refuses"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline=str(tmp_path / "mine"), trust_remote_code=True)
    assert not marker.exists()
    # Installed code is not remote code: the community pipelines still load.
    assert DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="one_step_unet") is not None


def test_a_file_must_define_exactly_one_pipeline_class(tmp_path):
    two = tmp_path / "two.py"
    two.write_text(textwrap.dedent("""
        from diffloom import DiffusionPipeline

        class First(DiffusionPipeline):
            pass

        class Second(First):
            pass
    """))
    with pytest.raises(CustomPipelineError, match=r"exactly one DiffusionPipeline subclass; it defines First, Second"):
        load_pipeline_file(two, trust_remote_code=True)

    none = tmp_path / "none.py"
    none.write_text("from diffloom_contrib.one_step_unet import UnetSchedulerOneForwardPipeline\n")
    with pytest.raises(CustomPipelineError,
                       match=r"it defines none \(imported, not counted: UnetSchedulerOneForwardPipeline\)"):
        load_pipeline_file(none, trust_remote_code=True)

    subclass = tmp_path / "subclass.py"
    subclass.write_text("from diffloom_contrib.one_step_unet import UnetSchedulerOneForwardPipeline\n\n"
                        "class Mine(UnetSchedulerOneForwardPipeline):\n    pass\n")
    assert load_pipeline_file(subclass, trust_remote_code=True).__name__ == "Mine"


def test_import_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import diffloom_no_such_module\n")
    with pytest.raises(ImportError, match=re.escape(str(broken)) + ".*diffloom_no_such_module"):
        load_pipeline_file(broken, trust_remote_code=True)
    crashing = tmp_path / "crashing.py"
    crashing.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(CustomPipelineError, match="crashing.py raised RuntimeError while it was imported: boom"):
        load_pipeline_file(crashing, trust_remote_code=True)


def test_names_nobody_provides(ddpm, tmp_path, monkeypatch):
    with pytest.raises(RegistryError, match="'one_stp_unet' is neither.*did you mean one_step_unet"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="one_stp_unet")
    with pytest.raises(RegistryError, match="community pipeline.*marigold_depth.*did you mean MarigoldPipeline"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="MarigoldPipelin")
    with pytest.raises(FileNotFoundError, match="no such file"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline=str(tmp_path / "missing.py"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without pipeline.py"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline=str(tmp_path / "empty"))
    # A folder that happens to carry a community pipeline's name (a model downloaded there) does not hide it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one_step_unet").mkdir()
    assert type(DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="one_step_unet")).__name__ == \
        "UnetSchedulerOneForwardPipeline"


# -- the Hub ---------------------------------------------------------------------------------------------------

COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub cache; ``publish(repo_id, commit, files, refs)`` lays out one snapshot."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def publish(repo_id, commit, files: dict, refs=("main",), folder=None):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / commit
        if folder is not None:
            shutil.copytree(folder, snapshot)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (snapshot / name).write_text(text)
        (repo / "refs").mkdir(exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(commit)

    return publish


def test_hub_pipeline_is_pinned_to_a_commit(ddpm, hub_cache):
    hub_cache("someone/their-pipeline", COMMIT_A, {"pipeline.py": TAGGED.format(tag="at A", marker="")})
    hub_cache("someone/their-pipeline", COMMIT_B, {"pipeline.py": TAGGED.format(tag="at B", marker="")},
              refs=("v2",))
    with pytest.raises(RemoteCodeRefused, match=f"Hub repo someone/their-pipeline at commit {COMMIT_A}.*sha256"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="someone/their-pipeline")

    pipe = DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="someone/their-pipeline", trust_remote_code=True)
    origin = origin_of(type(pipe))
    assert pipe() == "at A" and origin.commit == COMMIT_A and origin.revision == "main"
    assert COMMIT_A in type(pipe).__module__ and type(pipe).__module__.startswith("diffloom_remote.someone__")

    for revision in ("v2", COMMIT_B):
        pinned = DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="someone/their-pipeline",
                                                   custom_revision=revision, trust_remote_code=True)
        assert pinned() == "at B" and origin_of(type(pinned)).commit == COMMIT_B
    assert pipe() == "at A"  # the commit-A class kept its own module

    with pytest.raises(LoadError, match="someone/other-pipeline"):
        DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="someone/other-pipeline", trust_remote_code=True)


def test_model_index_naming_a_module_of_the_repo(ddpm, tmp_path, hub_cache, monkeypatch):
    folder = tmp_path / "with-code"
    shutil.copytree(ddpm, folder)
    write_pipeline(folder, "from the repo", name="tagged.py")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["tagged", "TaggedPipeline"]
    (folder / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(RemoteCodeRefused, match=r"tagged\.py.*trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)
    assert DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)() == "from the repo"

    # The same folder served from the Hub cache.
    hub_cache("someone/with-code", COMMIT_A, {}, folder=folder)
    pipe = DiffusionPipeline.from_pretrained("someone/with-code", trust_remote_code=True)
    assert pipe() == "from the repo" and origin_of(type(pipe)).commit == COMMIT_A

    monkeypatch.setenv("DIFFLOOM_DISABLE_REMOTE_CODE", "1")
    with pytest.raises(RemoteCodeRefused, match="DIFFLOOM_DISABLE_REMOTE_CODE"):
        DiffusionPipeline.from_pretrained("someone/with-code", trust_remote_code=True)
    monkeypatch.delenv("DIFFLOOM_DISABLE_REMOTE_CODE")

    index["_class_name"] = ["tagged", "Missing"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CustomPipelineError,
                       match=r"defines no 'Missing'; pipeline classes it defines: \['TaggedPipeline'\]"):
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)


# -- resolution through hooks ----------------------------------------------------------------------------------


def test_a_plugin_answers_before_the_built_in_resolution(ddpm, register_temporarily):
    from diffloom_contrib.one_step_unet import UnetSchedulerOneForwardPipeline as OneStep

    class Special(OneStep):
        pass

    class Resolver:
        @hookimpl
        def resolve_custom_pipeline(self, name, model_path, revision, trust_remote_code):
            if name in ("magic", "one_step_unet"):
                assert Path(model_path) == ddpm and revision is None and trust_remote_code is False
                return Special
            return None

    register_temporarily(Resolver(), "test-resolver")
    assert type(DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="magic")) is Special
    assert type(DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="one_step_unet")) is Special
    assert type(DiffusionPipeline.from_pretrained(ddpm, custom_pipeline="UnetSchedulerOneForwardPipeline")) is OneStep


def test_blocked_resolver_and_light_imports():
    """With the built-in resolver blocked the error says so; the pytest plugin does not import torch."""
    code = textwrap.dedent("""
        import sys
        import diffloom.testing
        assert "torch" not in sys.modules, "importing the pytest plugin imported torch"
        from diffloom.remote_code import load_custom_pipeline
        try:
            load_custom_pipeline("one_step_unet")
        except LookupError as e:
            print(e)
    """)
    env = {**os.environ, "DIFFLOOM_BLOCK_PLUGINS": "remote_code"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "no plugin resolves custom pipelines" in out.stdout and "remote_code" in out.stdout


# -- a third-party plugin, pip-installed ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_template(tmp_path_factory):
    """The plugin template, pip-installed into a folder of its own (built from a copy: no build files here)."""
    root = tmp_path_factory.mktemp("template")
    source = shutil.copytree(REPO_ROOT / "examples" / "diffloom-plugin-template", root / "src")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "--target", str(target), str(source)], check=True, capture_output=True)
    return target


def test_installed_plugin_is_found_through_its_entry_point(installed_template, ddpm):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_template), os.environ.get("PYTHONPATH", "")])}
    code = textwrap.dedent(f"""
        import json, torch
        from diffloom import DiffusionPipeline, TemplateDDIMScheduler
        from diffloom.registry import registry

        pipe = DiffusionPipeline.from_pretrained({str(ddpm)!r}, custom_pipeline="TemplatePipeline")
        same = DiffusionPipeline.from_pretrained({str(ddpm)!r}, custom_pipeline="template")
        pipe.scheduler = TemplateDDIMScheduler()
        images = pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
        from diffloom_plugin_template.hooks import steps_run
        print(json.dumps(dict(cls=type(pipe).__name__, same=type(same) is type(pipe), shape=list(images.shape),
                              low=images.min().item(), high=images.max().item(), steps=dict(steps_run),
                              provider=registry.entry("pipeline", "TemplatePipeline").provider)))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["cls"] == "TemplatePipeline" and seen["same"] and seen["provider"] == "template"
    assert seen["shape"] == [1, 3, 8, 8] and 0 <= seen["low"] <= seen["high"] <= 1
    assert seen["steps"] == {"TemplatePipeline": 3}  # the plugin's loop hook fired once per step

    listing = subprocess.run([sys.executable, "-m", "diffloom", "plugins"], env=env, capture_output=True,
                             text=True, check=True)
    plugins = {p["name"]: p for p in json.loads(listing.stdout)}
    template = plugins["template"]
    assert template["distribution"] == "diffloom-plugin-template"
    assert template["provides"] == {"pipeline": ["TemplatePipeline"], "scheduler": ["TemplateDDIMScheduler"]}
    assert template["hooks"] == ["on_step_end", "register_pipelines", "register_schedulers"]


def test_template_scheduler_is_deterministic_ddim(monkeypatch):
    import diffusers

    monkeypatch.syspath_prepend(str(REPO_ROOT / "examples" / "diffloom-plugin-template"))
    from diffloom_plugin_template.scheduler import TemplateDDIMScheduler

    ours, reference = TemplateDDIMScheduler(), diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    assert ours.timesteps.tolist() == reference.timesteps.tolist()
    x = y = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        eps = 0.3 * x + torch.sin(t / 100.0)  # any prediction will do, as long as both get the same
        x = ours.step(eps, t, x).prev_sample
        y = reference.step(0.3 * y + torch.sin(t / 100.0), t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-5)  # diffusers keeps alpha-bar in float32, we in float64


# -- the pytest plugin ------------------------------------------------------------------------------------------


def test_pytest_plugin_fixtures(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import torch
        from diffloom import hookimpl
        from diffloom.registry import registry

        class Plugin:
            @hookimpl
            def register_pipelines(self, register):
                register("FixturePipeline", "diffloom_contrib.one_step_unet:UnetSchedulerOneForwardPipeline")

        def test_isolated_registry(diffloom_registry):
            assert diffloom_registry.names("pipeline") == []
            diffloom_registry.register_plugin(Plugin(), "mine")
            assert diffloom_registry.names("pipeline") == ["FixturePipeline"]
            assert "FixturePipeline" not in registry.names("pipeline")

        def test_register_temporarily(register_temporarily):
            register_temporarily(Plugin(), "temporary")
            assert "FixturePipeline" in registry.names("pipeline")

        def test_removed_afterwards():
            assert "FixturePipeline" not in registry.names("pipeline")

        def test_tiny_components(tiny_unet2d, tiny_scheduler, tiny_ddpm_folder, tiny_unet2d_condition, tiny_vae,
                                 tiny_clip_tokenizer, tiny_clip_text_encoder):
            with torch.no_grad():
                assert tiny_unet2d(torch.zeros(1, 3, 8, 8), 1).sample.shape == (1, 3, 8, 8)
                ids = tiny_clip_tokenizer("the cat", return_tensors="pt").input_ids
                states = tiny_clip_text_encoder(ids).last_hidden_state
                assert tiny_unet2d_condition(torch.zeros(1, 4, 8, 8), 1, states).sample.shape == (1, 4, 8, 8)
                assert tiny_vae.decode(torch.zeros(1, 4, 4, 4)).sample.shape == (1, 3, 32, 32)
            assert type(tiny_scheduler).__name__ == "DDPMScheduler"
            assert (tiny_ddpm_folder / "unet" / "config.json").is_file()
    """))
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
