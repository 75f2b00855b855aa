"""Config objects: diffusers' config.json format, read-only configs, unknown keys kept, from_config."""

import json

import pytest

from diffloom.configuration import ConfigError, ConfigMixin, register_to_config


class Thing(ConfigMixin):
    config_name = "thing_config.json"

    @register_to_config
    def __init__(self, size=3, mode="a", factors=(1, 2)):
        self.built_with = dict(size=size, mode=mode, factors=factors)


def test_every_argument_is_recorded_given_or_defaulted():
    t = Thing(5)
    assert t.config["size"] == 5 and t.config.mode == "a" and t.config.factors == (1, 2)
    assert sorted(t.config["_use_default_values"]) == ["factors", "mode"]


def test_config_is_read_only():
    t = Thing()
    with pytest.raises(TypeError, match="read-only"):
        t.config["size"] = 4
    with pytest.raises(TypeError, match="read-only"):
        t.config.size = 4
    with pytest.raises(TypeError):
        t.config.update(size=4)


def test_save_writes_diffusers_format_and_loads_back(tmp_path):
    Thing(size=7, mode="b").save_config(tmp_path)
    data = json.loads((tmp_path / "thing_config.json").read_text())
    assert data["_class_name"] == "Thing" and "_diffusers_version" in data
    assert data["size"] == 7 and data["factors"] == [1, 2] and "_use_default_values" not in data
    again = Thing.from_config(Thing.load_config(tmp_path))
    assert again.built_with == {"size": 7, "mode": "b", "factors": [1, 2]}


def test_unknown_keys_are_kept_but_not_passed(tmp_path):
    t = Thing.from_config({"size": 2, "future_key": 11, "_class_name": "Thing"})
    assert t.built_with["size"] == 2 and t.config["future_key"] == 11
    t.save_config(tmp_path)
    assert json.loads((tmp_path / "thing_config.json").read_text())["future_key"] == 11


def test_keyword_overrides_win_and_unused_ones_are_returned():
    t, unused = Thing.from_config({"size": 2}, return_unused_kwargs=True, size=9, colour="red")
    assert t.config.size == 9 and unused == {"colour": "red"}


def test_defaults_of_the_source_do_not_travel_to_another_class():
    class Other(ConfigMixin):
        @register_to_config
        def __init__(self, size=100, mode="z"):
            self.args = (size, mode)

    source = Thing(size=4)  # mode defaulted: Other must use its own default
    assert Other.from_config(source.config).args == (4, "z")


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="config dict"):
        Thing.from_config("some/path")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "thing_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"thing_config.json is not valid JSON \(line 1"):
        Thing.load_config(bad)
    (bad / "thing_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        Thing.load_config(bad)
    with pytest.raises(OSError, match="does not exist|not a folder"):
        Thing.load_config(tmp_path / "missing")
