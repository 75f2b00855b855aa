"""The model base class: safetensors straight into a meta-built module, shards, variants, dtypes, refusals."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from diffloom.modeling import WeightsError
from toy import ToyModel


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(dim=5)
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_round_trip(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = ToyModel.from_pretrained(path)
    assert same_weights(model, loaded) and loaded.config.dim == 5 and not loaded.training
    assert loaded.dim == 5  # config values read as attributes, as on diffusers models


def test_loading_builds_no_random_weights(saved, monkeypatch):
    _, path = saved

    def refuse_real(original):
        def init(tensor, *a, **k):
            assert tensor.device.type == "meta", "random initialisation ran on real memory while loading"
            return original(tensor, *a, **k)

        return init

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", refuse_real(torch.nn.init.kaiming_uniform_))
    monkeypatch.setattr(torch.nn.init, "uniform_", refuse_real(torch.nn.init.uniform_))
    model = ToyModel.from_pretrained(path)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_sharded_checkpoint_with_index(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100B")
    index = json.loads((tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert not (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors").exists()
    assert same_weights(model, ToyModel.from_pretrained(tmp_path / "sharded"))


def test_variant_and_fallback(saved, tmp_path):
    model, path = saved
    model.to(torch.float16).save_pretrained(path, variant="fp16")
    assert (path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    half = ToyModel.from_pretrained(path, variant="fp16", torch_dtype=torch.float16)
    assert half.dtype == torch.float16 and same_weights(model, half)
    with pytest.warns(UserWarning, match="no 'bf16' variant"):
        ToyModel.from_pretrained(path, variant="bf16")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "bfloat16"])
def test_torch_dtype(saved, dtype):
    _, path = saved
    model = ToyModel.from_pretrained(path, torch_dtype=dtype)
    assert model.dtype == (torch.bfloat16 if dtype == "bfloat16" else dtype)
    model(torch.ones(1, 5, dtype=model.dtype), 0)


def test_pickle_is_refused_unless_opted_in(saved, tmp_path):
    model, _ = saved
    folder = tmp_path / "pickled"
    folder.mkdir()
    model.save_config(folder)
    torch.save(model.state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle.*allow_pickle=True"):
        ToyModel.from_pretrained(folder)
    assert same_weights(model, ToyModel.from_pretrained(folder, allow_pickle=True))
    with pytest.raises(WeightsError, match="no weights"):
        ToyModel.from_pretrained(folder, use_safetensors=True)


def test_truncated_safetensors_names_the_file(saved):
    _, path = saved
    f = path / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors is not a readable"):
        ToyModel.from_pretrained(path)


def test_config_and_weights_that_disagree(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden"] = 7
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"inp.weight has shape \(6, 5\) but the config builds \(7, 5\)"):
        ToyModel.from_pretrained(path)


def test_missing_and_unexpected_keys_are_named(saved):
    model, path = saved
    sd = dict(model.state_dict())
    sd.pop("out.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError, match="missing 1 keys.*out.bias.*unexpected 1 keys.*extra.weight"):
        ToyModel.from_pretrained(path)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(OSError, match="not a folder"):
        ToyModel.from_pretrained(tmp_path / "nowhere" / "x")
    (tmp_path / "empty").mkdir()
    ToyModel().save_config(tmp_path / "empty")
    with pytest.raises(WeightsError, match="no weights in .*empty.*diffusion_pytorch_model.safetensors"):
        ToyModel.from_pretrained(tmp_path / "empty")


def test_subfolder(saved, tmp_path):
    model, _ = saved
    model.save_pretrained(tmp_path / "repo" / "unet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same_weights(model, ToyModel.from_pretrained(tmp_path / "repo", subfolder="unet"))
