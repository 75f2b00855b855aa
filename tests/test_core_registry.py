"""The plugin registry: entry points, lazy imports, isolation of broken plugins, collisions, allow/block lists."""

import json
import subprocess
import sys
import textwrap

import pytest

from diffloom import hookimpl
from diffloom.registry import Registry, RegistryError


def make_distribution(root, dist, modules: dict, entry_points: dict):
    """Lay out an installed distribution (dist-info with entry points) and its modules under ``root``."""
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[diffloom]\n{lines}\n")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


GOOD = """
from diffloom import hookimpl

@hookimpl
def register_schedulers(register):
    register("ToyScheduler", "toy_schedulers_impl:ToyScheduler")
"""

GOOD_IMPL = """
import torch  # the heavy module: imported only when the class is asked for
class ToyScheduler:
    pass
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DIFFLOOM_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DIFFLOOM_BLOCK_PLUGINS", raising=False)
    return tmp_path


def test_entry_point_plugin_is_found_and_imported_lazily(site):
    make_distribution(site, "toy-plugin", {"toy_schedulers": GOOD, "toy_schedulers_impl": GOOD_IMPL},
                      {"toy": "toy_schedulers"})
    reg = Registry()
    assert "ToyScheduler" in reg.names("scheduler")
    assert "toy_schedulers_impl" not in sys.modules
    cls = reg.get("scheduler", "ToyScheduler")
    assert cls.__name__ == "ToyScheduler" and "toy_schedulers_impl" in sys.modules
    info = next(p for p in reg.plugins() if p["name"] == "toy")
    assert info["distribution"] == "toy-plugin" and info["provides"] == {"scheduler": ["ToyScheduler"]}
    assert info["hooks"] == ["register_schedulers"]


def test_broken_plugin_is_reported_and_the_rest_keep_working(site):
    make_distribution(site, "broken-plugin", {"broken_mod": "raise ImportError('no such thing: flux')"},
                      {"broken": "broken_mod"})
    with pytest.warns(UserWarning, match="broken"):
        reg = Registry()
        names = reg.names("scheduler")
    assert "DDPMScheduler" in names
    info = next(p for p in reg.plugins() if p["name"] == "broken")
    assert "flux" in info["error"]


def test_plugin_whose_registration_raises_is_isolated(site):
    make_distribution(site, "bad-reg", {"bad_reg": """
        from diffloom import hookimpl
        @hookimpl
        def register_models(register):
            raise RuntimeError("boom in registration")
    """}, {"badreg": "bad_reg"})
    with pytest.warns(UserWarning, match="boom"):
        reg = Registry()
        assert "UNet2DConditionModel" in reg.names("model")
    assert "boom" in next(p for p in reg.plugins() if p["name"] == "badreg")["error"]


def test_name_claimed_twice_is_refused_naming_both(site):
    make_distribution(site, "clash-plugin", {"clash": """
        from diffloom import hookimpl
        @hookimpl
        def register_schedulers(register):
            register("DDPMScheduler", "clash:Other")
    """}, {"clash": "clash"})
    with pytest.warns(UserWarning, match="both"):
        reg = Registry()
        reg.ensure_loaded()
    with pytest.raises(RegistryError, match="schedulers.*clash|clash.*schedulers"):
        reg.get("scheduler", "DDPMScheduler")


def test_explicit_override_is_allowed_and_reported(site):
    make_distribution(site, "override-plugin", {"override_mod": """
        from diffloom import hookimpl
        class DDPMScheduler:
            pass
        @hookimpl
        def register_schedulers(register):
            register("DDPMScheduler", DDPMScheduler, override=True)
    """}, {"zz_override": "override_mod"})
    reg = Registry()
    assert reg.get("scheduler", "DDPMScheduler").__module__ == "override_mod"
    entry = reg.entry("scheduler", "DDPMScheduler")
    assert entry.overrides == "schedulers"
    info = next(p for p in reg.plugins() if p["name"] == "zz_override")
    assert "overrides" in info["notes"][0]


def test_allow_list_and_block_list(site, monkeypatch):
    make_distribution(site, "toy-plugin", {"toy_schedulers": GOOD, "toy_schedulers_impl": GOOD_IMPL},
                      {"toy": "toy_schedulers"})
    monkeypatch.setenv("DIFFLOOM_LOAD_PLUGINS", "toy")
    reg = Registry()
    assert reg.names("scheduler") == ["ToyScheduler"]
    monkeypatch.setenv("DIFFLOOM_LOAD_PLUGINS", "")
    assert Registry().names("scheduler") == []
    monkeypatch.delenv("DIFFLOOM_LOAD_PLUGINS")
    monkeypatch.setenv("DIFFLOOM_BLOCK_PLUGINS", "toy-plugin, models")
    reg = Registry()
    assert "ToyScheduler" not in reg.names("scheduler") and "UNet2DModel" not in reg.names("model")
    assert "DDIMScheduler" in reg.names("scheduler")


def test_unknown_name_suggests_close_matches():
    reg = Registry()
    with pytest.raises(RegistryError, match="did you mean DDIMScheduler"):
        reg.get("scheduler", "DDIMSchedular")


def test_hand_registered_plugin_and_unregister():
    reg = Registry()

    class Plugin:
        @hookimpl
        def register_pipelines(self, register):
            register("MyPipe", "json:JSONDecoder")

    reg.register_plugin(Plugin(), "mine")
    assert reg.get("pipeline", "MyPipe") is json.JSONDecoder
    reg.unregister_plugin("mine")
    assert "MyPipe" not in reg.names("pipeline")


def test_from_diffloom_import_resolves_plugin_classes_lazily():
    code = ("import sys, diffloom; assert 'torch' not in sys.modules; "
            "from diffloom import DDPMScheduler, UNet2DModel, DiffusionPipeline; "
            "print(DDPMScheduler.__module__, UNet2DModel.__module__, DiffusionPipeline.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["diffloom_schedulers.ddpm", "diffloom_models.unet_2d", "diffloom.pipeline"]


def test_unknown_attribute_of_diffloom_is_an_attribute_error_with_hint():
    import diffloom

    with pytest.raises(AttributeError, match="did you mean DDPMScheduler"):
        diffloom.DDPMSchedulr  # noqa: B018


def test_import_and_plugin_listing_do_not_import_torch():
    code = ("import sys, io, contextlib, diffloom.cli as c\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf): c.main(['plugins', '--all'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    names = {p["name"] for p in json.loads(out)}
    assert {"schedulers", "models", "pipelines"} <= names
