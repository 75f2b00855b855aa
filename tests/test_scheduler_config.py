"""Scheduler configs: conversions between families, save/load, and folders that diffusers and we both read."""

import inspect
import json
import logging

import diffusers
import numpy as np
import pytest
import torch

from diffloom_schedulers.ddim import DDIMScheduler
from diffloom_schedulers.ddpm import DDPMScheduler
from diffloom_schedulers.euler import EulerDiscreteScheduler
from diffloom_schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from diffloom_schedulers.heun import HeunDiscreteScheduler
from diffloom_schedulers.lcm import LCMScheduler
from diffloom_schedulers.lms import LMSDiscreteScheduler
from diffloom_schedulers.pndm import PNDMScheduler

OURS = [DDPMScheduler, DDIMScheduler, PNDMScheduler, LCMScheduler, EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler]

# A Stable-Diffusion-like setup plus options that only some families take, so conversions have keys to drop,
# keep hidden and hand on.
SETTINGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True, prediction_type="v_prediction",
                use_karras_sigmas=True, timestep_spacing="trailing", sigma_min=0.1, original_inference_steps=40)


@pytest.fixture(autouse=True)
def quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def reference(cls):
    return getattr(diffusers, cls.__name__)


def settings_for(cls):
    keys = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in SETTINGS.items() if k in keys}


def comparable(config):
    """A config as a plain dict, without the writer's version; the defaulted-key list is a set."""
    config = dict(config)
    config.pop("_diffusers_version", None)
    if "_use_default_values" in config:
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


def init_values(scheduler):
    keys = set(inspect.signature(type(scheduler).__init__).parameters) - {"self"}
    return {k: scheduler.config[k] for k in keys}


def ids(cls):
    return cls.__name__.replace("Scheduler", "")


@pytest.mark.parametrize("source", OURS, ids=ids)
def test_from_config_between_families_matches_diffusers(source):
    ours_src, ref_src = source(**settings_for(source)), reference(source)(**settings_for(source))
    assert comparable(ours_src.config) == comparable(ref_src.config)
    for target in OURS:
        ours, ref = target.from_config(ours_src.config), reference(target).from_config(ref_src.config)
        assert comparable(ours.config) == comparable(ref.config), f"{source.__name__} -> {target.__name__}"
        # and the libraries accept each other's in-memory configs
        assert comparable(reference(target).from_config(ours_src.config).config) == comparable(ref.config)
        assert comparable(target.from_config(ref_src.config).config) == comparable(ours.config)


def test_converted_scheduler_samples_like_diffusers():
    ddim = DDIMScheduler(**settings_for(DDIMScheduler))
    ours = EulerDiscreteScheduler.from_config(ddim.config, use_karras_sigmas=False)
    ref = diffusers.EulerDiscreteScheduler.from_config(
        diffusers.DDIMScheduler(**settings_for(DDIMScheduler)).config, use_karras_sigmas=False)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(12)
    assert not ours.config.use_karras_sigmas and ours.config.sigma_min is None
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


def test_overrides_and_unused_kwargs():
    s, unused = EulerDiscreteScheduler.from_config(DDPMScheduler().config, return_unused_kwargs=True,
                                                   timestep_spacing="leading", colour="red")
    assert s.config.timestep_spacing == "leading" and unused.get("colour") == "red"


@pytest.mark.parametrize("cls", OURS, ids=ids)
def test_save_and_load_round_trip_and_cross_read(cls, tmp_path):
    settings = settings_for(cls)
    ours, ref = cls(**settings), reference(cls)(**settings)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "theirs")

    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    expected = json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text())
    assert written["_class_name"] == cls.__name__
    assert comparable(written) == comparable(expected)

    again = cls.from_pretrained(tmp_path / "ours")
    assert init_values(again) == init_values(ours)
    read_by_diffusers = reference(cls).from_pretrained(tmp_path / "ours")
    diffusers_own = reference(cls).from_pretrained(tmp_path / "theirs")
    assert comparable(read_by_diffusers.config) == comparable(diffusers_own.config)
    read_by_us = cls.from_pretrained(tmp_path / "theirs")
    assert comparable(read_by_us.config) == comparable(again.config)

    for scheduler in (read_by_us, read_by_diffusers):
        scheduler.set_timesteps(8)
    assert torch.equal(read_by_us.timesteps, read_by_diffusers.timesteps)


def test_trained_betas_travel_as_a_list(tmp_path):
    betas = np.linspace(0.0002, 0.03, 200)
    ours = DDPMScheduler(num_train_timesteps=200, trained_betas=betas)
    ours.save_pretrained(tmp_path)
    ref = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["trained_betas"] == betas.tolist()
    assert torch.equal(DDPMScheduler.from_pretrained(tmp_path).betas, ref.betas)
    assert torch.equal(ours.betas, torch.tensor(betas, dtype=torch.float32))


def test_subfolder_like_a_model_repo(tmp_path):
    diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1).save_pretrained(tmp_path / "scheduler")
    s = PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert s.config.skip_prk_steps and s.config.steps_offset == 1
