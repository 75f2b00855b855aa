"""KDPM2 (plain and ancestral), singlestep DPM-Solver, TCD, EDM Euler and DDIM inversion against diffusers.

A seeded random-config sweep per class runs set_timesteps (step counts, custom timesteps or ramps, TCD's
original_inference_steps and strength), an optional img2img start (add_noise + set_begin_index on a sliced
schedule), scale_model_input and step with seeded generators, in float32 and float16, and compares every step.
Then each class drives a tiny StableDiffusionPipeline against diffusers', and the places where diffloom
differs on purpose are pinned down one by one:
  * sde-dpmsolver++ third order (solver_type='heun'): diffusers' D2 weight has the wrong sign on its 1/2 term
    (the multistep solver has the same bug); ours integrates a quadratic model output exactly.
  * singlestep dpmsolver with thresholding: diffusers indexes alpha_t with timestep=None and crashes.
  * singlestep set_timesteps: diffusers writes lower_order_final=True into the config when the steps do not
    tile into blocks, so a scheduler's later runs depend on its earlier ones; ours keeps the config.
  * singlestep add_noise before set_timesteps: diffusers reads its sigma ladder backwards.
  * errors instead of diffusers' late IndexError / NaN / AssertionError (a step past the last timestep,
    KDPM2 with prediction_type='sample', TCD's eta outside [0, 1]).

Tolerance: float32 max error relative to max(1, |reference|) <= 1e-6 (every case here agrees bit for bit);
float16 <= 1e-3. Where diffusers gives NaN (KDPM2 ancestral on the cosine schedule, whose first sigma_down
rounds below zero) ours gives NaN at the same places.
"""

import importlib
import inspect
import json
import math
import random

import numpy as np
import pytest
import torch

import diffloom
import diffusers
import tiny
from diffloom.registry import registry
from diffloom_schedulers import SCHEDULERS

NEW = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler",
       "TCDScheduler", "EDMEulerScheduler", "DDIMInverseScheduler")
OURS = {name: getattr(importlib.import_module(f"diffloom_schedulers.{SCHEDULERS[name]}"), name) for name in NEW}
TAKES_GENERATOR = {"KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler", "TCDScheduler",
                   "EDMEulerScheduler"}
SHAPE = (2, 4, 4, 4)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(autouse=True)
def quiet_loggers(caplog):
    caplog.set_level("ERROR", logger="diffusers")
    caplog.set_level("ERROR", logger="diffloom_schedulers")


def fake_model(x, t):
    """A smooth, deterministic stand-in denoiser, in float32 whatever the latent's dtype."""
    return torch.sin(0.7 * x.float() + float(t) / 300.0) * 0.8 + 0.1 * x.float()


def relative_error(ours, ref):
    """Max |ours - ref| over max(1, |ref|) on the finite entries; inf unless NaN and inf sit in the same places."""
    ours, ref = ours.double(), ref.double()
    finite = torch.isfinite(ref)
    if not (torch.equal(torch.isnan(ours), torch.isnan(ref))
            and torch.equal(ours[torch.isinf(ref)], ref[torch.isinf(ref)])):
        return float("inf")
    if not finite.any():
        return 0.0
    return (ours[finite] - ref[finite]).abs().max().item() / max(1.0, ref[finite].abs().max().item())


# -- random configs ------------------------------------------------------------------------------------------

def _vp_basics(rng, c, predictions=("epsilon", "v_prediction", "sample")):
    T = rng.choice([1000, 1000, 100, 37])
    c.update(num_train_timesteps=T, beta_schedule=rng.choice(["linear", "scaled_linear", "squaredcos_cap_v2"]),
             prediction_type=rng.choice(predictions))
    if rng.random() < 0.5:
        c["beta_start"], c["beta_end"] = rng.choice([(0.00085, 0.012), (0.0005, 0.03)])
    if rng.random() < 0.1:
        c["trained_betas"] = np.linspace(2e-4, 0.02, T).tolist()
    return T


def random_config(rng: random.Random, name: str) -> tuple[dict, int]:
    """A valid config for ``name``, outside the cases listed in the module docstring."""
    c = {}
    if name == "EDMEulerScheduler":
        c.update(sigma_min=rng.choice([0.002, 0.02]), sigma_max=rng.choice([80.0, 14.6]),
                 sigma_data=rng.choice([0.5, 1.0]), sigma_schedule=rng.choice(["karras", "exponential"]),
                 num_train_timesteps=rng.choice([1000, 100]), prediction_type=rng.choice(["epsilon", "v_prediction"]),
                 rho=rng.choice([7.0, 5.0]), final_sigmas_type=rng.choice(["zero", "sigma_min"]))
        return c, c["num_train_timesteps"]
    if name.startswith("KDPM2"):  # their step refuses x0 prediction (diffusers: NotImplementedError)
        T = _vp_basics(rng, c, ("epsilon", "v_prediction"))
        c.update(timestep_spacing=rng.choice(["leading", "trailing", "linspace"]), steps_offset=rng.choice([0, 0, 1, 2]))
        if rng.random() < 0.45:
            c[rng.choice(["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])] = True
        return c, T
    T = _vp_basics(rng, c)
    if name == "DPMSolverSinglestepScheduler":
        c.update(solver_order=rng.choice([1, 2, 3]), algorithm_type=rng.choice(["dpmsolver++", "sde-dpmsolver++",
                                                                               "dpmsolver"]),
                 solver_type=rng.choice(["midpoint", "heun"]), lower_order_final=rng.random() < 0.5)
        if c["algorithm_type"] == "sde-dpmsolver++" and c["solver_order"] == 3:
            c["solver_type"] = "midpoint"  # heun: diffusers' sign error (test below)
        c["final_sigmas_type"] = "sigma_min" if c["algorithm_type"] == "dpmsolver" else rng.choice(["zero",
                                                                                                   "sigma_min"])
        if rng.random() < 0.25 and c["algorithm_type"] != "dpmsolver":  # (dpmsolver: diffusers crashes, below)
            c.update(thresholding=True, dynamic_thresholding_ratio=rng.choice([0.995, 0.9]),
                     sample_max_value=rng.choice([1.0, 1.5]))
        if rng.random() < 0.15 and c["algorithm_type"] != "dpmsolver":
            c.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=rng.choice([1.0, 3.0]))
            if c["algorithm_type"] == "sde-dpmsolver++":
                c["final_sigmas_type"] = "zero"  # sigma_min lies above the last flow sigma: a step up in noise
        elif rng.random() < 0.45:
            c[rng.choice(["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])] = True
        if c["beta_schedule"] == "squaredcos_cap_v2" and rng.random() < 0.3:
            c["lambda_min_clipped"] = -5.1
        return c, T
    c.update(steps_offset=rng.choice([0, 0, 1]), rescale_betas_zero_snr=rng.random() < 0.2,
             set_alpha_to_one=rng.random() < 0.5, clip_sample=rng.random() < 0.4)
    if c["rescale_betas_zero_snr"]:
        c["prediction_type"] = "v_prediction"  # zero terminal SNR leaves nothing to read eps or x0 from at T - 1
    if name == "TCDScheduler":
        c.update(original_inference_steps=rng.choice([50, 20, 100, 37]), timestep_scaling=rng.choice([10.0, 5.0]))
    else:  # DDIMInverseScheduler
        c["timestep_spacing"] = rng.choice(["leading", "trailing"])
    return c, T


def random_call(rng: random.Random, name: str, config: dict, T: int) -> dict:
    """set_timesteps arguments, img2img strength (or None), dtype, step kwargs and a seed."""
    steps = rng.choice([1, 2, 3, 4, 5, 7, 10, 13, 25] + ([T - 1, T] if name.startswith("KDPM2") and T <= 100 else []))
    set_kwargs = {"num_inference_steps": min(steps, T)}
    respaced = any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                           "use_flow_sigmas"))
    if name in ("DPMSolverSinglestepScheduler", "TCDScheduler") and not respaced and rng.random() < 0.15:
        set_kwargs = {"timesteps": sorted(rng.sample(range(T), min(rng.randint(2, 8), T)), reverse=True)}
    if name == "EDMEulerScheduler" and rng.random() < 0.2:
        set_kwargs = {"sigmas": torch.tensor(sorted(rng.uniform(0, 1) for _ in range(rng.randint(2, 6))))}
    step_kwargs = {}
    if name == "TCDScheduler":
        step_kwargs["eta"] = rng.choice([0.0, 0.3, 0.5, 1.0])
        if rng.random() < 0.3:
            set_kwargs["strength"] = rng.choice([0.5, 1.0])
        if "num_inference_steps" in set_kwargs and rng.random() < 0.2:
            set_kwargs["original_inference_steps"] = rng.choice([10, 30, 50])
    if name == "EDMEulerScheduler" and rng.random() < 0.3:
        step_kwargs = {"s_churn": rng.choice([0.5, 1.0, 40.0]), "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    img2img = rng.random() < 0.3 and name != "DDIMInverseScheduler"  # (inversion has no add_noise)
    return dict(set_kwargs=set_kwargs, strength=rng.choice([0.3, 0.6, 0.9]) if img2img else None,
                set_begin_index=rng.random() < 0.7, dtype=torch.float16 if rng.random() < 0.15 else torch.float32,
                step_kwargs=step_kwargs, seed=rng.randint(0, 10**6))


def run(scheduler, name, call):
    """The loop a pipeline runs: every tensor the scheduler hands back, in order."""
    scheduler.set_timesteps(**call["set_kwargs"])
    record = {"timesteps": scheduler.timesteps, "init_noise_sigma": torch.as_tensor(scheduler.init_noise_sigma)}
    for key in ("sigmas", "sigmas_interpol", "sigmas_down"):
        if hasattr(scheduler, key):
            record[key] = getattr(scheduler, key)
    if hasattr(scheduler, "order_list"):
        record["order_list"] = torch.tensor(scheduler.order_list)
    timesteps, begin = scheduler.timesteps, 0
    generator = torch.Generator().manual_seed(call["seed"])
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    if call["strength"] is not None:  # img2img, as the pipelines slice it
        n = scheduler.num_inference_steps or len(timesteps)
        begin = max(n - min(int(n * call["strength"]), n), 0) * scheduler.order
        timesteps = timesteps[begin:]
    repeated = len(torch.unique(scheduler.timesteps)) < len(scheduler.timesteps)
    if hasattr(scheduler, "set_begin_index") and (call["set_begin_index"] or repeated):
        scheduler.set_begin_index(begin)
    if len(timesteps) == 0:
        return record, []
    if call["strength"] is not None:
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
        record["add_noise"] = x
    else:
        x = noise * scheduler.init_noise_sigma
    x = x.to(call["dtype"])
    step_generator = torch.Generator().manual_seed(call["seed"] + 1)
    steps = []
    for t in timesteps:
        model_input = scheduler.scale_model_input(x, t)
        kwargs = dict(call["step_kwargs"], **({"generator": step_generator} if name in TAKES_GENERATOR else {}))
        out = scheduler.step(fake_model(model_input, t).to(call["dtype"]), t, x, **kwargs)
        second = out.pred_noised_sample if name == "TCDScheduler" else getattr(out, "pred_original_sample", None)
        steps.append((model_input, out.prev_sample, second))
        x = out.prev_sample
    return record, steps


def assert_same(name, config, call):
    """Run both libraries; returns the largest relative error seen (or the error both raised)."""
    what = f"{name} {json.dumps({k: v for k, v in config.items() if k != 'trained_betas'})} {call}"
    try:
        ref_record, ref_steps = run(getattr(diffusers, name)(**config), name, call)
    except ValueError as error:  # e.g. TCD's original_inference_steps above num_train_timesteps
        with pytest.raises(ValueError):
            run(OURS[name](**config), name, call)
        return error
    ours_record, ours_steps = run(OURS[name](**config), name, call)
    worst = 0.0
    for key, ref in ref_record.items():
        ours = ours_record[key]
        assert ours.shape == ref.shape, f"{what}: {key} shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
        assert ours.dtype == ref.dtype, f"{what}: {key} dtype {ours.dtype} vs {ref.dtype}"
        worst = max(worst, relative_error(ours, ref))
        assert worst <= 1e-6, f"{what}: {key} differs"
    tolerance = 1e-3 if call["dtype"] == torch.float16 else 1e-6
    assert len(ours_steps) == len(ref_steps)
    for i, (ours, ref) in enumerate(zip(ours_steps, ref_steps)):
        assert ours[1].dtype == ref[1].dtype, f"{what}: step {i} dtype"
        for label, a, b in (("model input", ours[0], ref[0]), ("prev_sample", ours[1], ref[1]),
                            ("second output", ours[2], ref[2])):
            if b is not None:
                error = relative_error(a, b)
                assert error <= tolerance, f"{what}: step {i} {label} error {error:.3g}"
                worst = max(worst, error)
    return worst


RANDOM_CASES = []
for _name in NEW:
    _rng = random.Random(f"more-{_name}")
    for _k in range(30):
        _config, _T = random_config(_rng, _name)
        RANDOM_CASES.append(pytest.param(_name, _config, random_call(_rng, _name, _config, _T),
                                         id=f"{_name.replace('Scheduler', '')}-{_k}"))


@pytest.mark.parametrize("name,config,call", RANDOM_CASES)
def test_random_config_matches_diffusers(name, config, call):
    assert_same(name, config, call)


# -- configs, registration, pipelines --------------------------------------------------------------------------

def comparable(config):
    config = json.loads(json.dumps(dict(config), default=str))
    config.pop("_diffusers_version", None)
    if "_use_default_values" in config:
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


@pytest.mark.parametrize("name", NEW)
def test_interface_matches_diffusers(name):
    def params(function):
        return [(n, p.default) for n, p in inspect.signature(function).parameters.items() if n != "self"]

    ours, ref = OURS[name], getattr(diffusers, name)
    assert params(ours.__init__) == params(ref.__init__)
    assert ours.order == ref.order and len(ours()) == len(ref())
    assert sorted(cls.__name__ for cls in ours().compatibles) == sorted(
        cls.__name__ for cls in ref().compatibles if cls.__name__ in SCHEDULERS)
    for method in ("set_timesteps", "step", "scale_model_input", "add_noise", "set_begin_index"):
        assert hasattr(ours, method) == hasattr(ref, method), method
        if hasattr(ref, method):
            ours_names = [n for n, _ in params(getattr(ours, method))]
            ref_names = [n for n, _ in params(getattr(ref, method)) if n not in ("args", "kwargs")]
            assert ours_names[:len(ref_names)] == ref_names, method
    assert getattr(diffloom, name) is ours


def test_configs_convert_between_all_families_like_diffusers():
    rng = random.Random("more-from-config")
    for _ in range(12):
        source = rng.choice(list(SCHEDULERS))
        config = {"num_train_timesteps": rng.choice([1000, 100]), "prediction_type": rng.choice(
            ["epsilon", "v_prediction"])}
        config.update({"beta_schedule": rng.choice(["linear", "scaled_linear"])} if source != "EDMEulerScheduler"
                      else {"sigma_schedule": rng.choice(["karras", "exponential"])})
        ours_source = registry.find_class(source)(**config)
        ref_source = getattr(diffusers, source)(**config)
        for target in NEW:
            what = f"{source} {config} -> {target}"
            ours, ref = OURS[target].from_config(ours_source.config), getattr(diffusers, target).from_config(
                ref_source.config)
            assert comparable(ours.config) == comparable(ref.config), what
            assert comparable(OURS[target].from_config(dict(ref_source.config)).config) == comparable(ours.config)
            try:
                ref.set_timesteps(7)
            except ValueError:  # e.g. DDIM inversion from a config with timestep_spacing='linspace'
                with pytest.raises(ValueError):
                    ours.set_timesteps(7)
                continue
            ours.set_timesteps(7)
            assert relative_error(ours.timesteps, ref.timesteps) == 0.0, what
            if hasattr(ref, "sigmas"):
                assert relative_error(ours.sigmas, ref.sigmas) == 0.0, what
        # and back: a new family's config into the existing ones
        for target in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"):
            source_new = rng.choice(NEW)
            ours = registry.find_class(target).from_config(OURS[source_new]().config)
            ref = getattr(diffusers, target).from_config(getattr(diffusers, source_new)().config)
            assert comparable(ours.config) == comparable(ref.config), f"{source_new} -> {target}"


@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                  "DPMSolverSinglestepScheduler"])
@pytest.mark.parametrize("option", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_sigma_bounds_carried_from_an_euler_config(name, option):
    # A config converted from Euler keeps sigma_min / sigma_max as hidden keys, and diffusers re-spaces between them.
    source = {option: True, "sigma_min": 0.1, "sigma_max": 20.0}
    ours = OURS[name].from_config(diffloom.EulerDiscreteScheduler(**source).config)
    ref = getattr(diffusers, name).from_config(diffusers.EulerDiscreteScheduler(**source).config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(6)
    assert relative_error(ours.timesteps, ref.timesteps) <= 1e-12  # (beta quantiles: bisection here, scipy there)
    assert torch.equal(ours.sigmas, ref.sigmas) and ours.sigmas[0].item() == pytest.approx(20.0)


@pytest.mark.parametrize("name", NEW)
def test_folders_read_and_written_like_diffusers(name, tmp_path):
    getattr(diffusers, name)(num_train_timesteps=100).save_pretrained(tmp_path)
    ours, ref = OURS[name].from_pretrained(tmp_path), getattr(diffusers, name).from_pretrained(tmp_path)
    assert comparable(ours.config) == comparable(ref.config)
    ours.save_pretrained(tmp_path / "again")
    assert comparable(getattr(diffusers, name).from_pretrained(tmp_path / "again").config) == comparable(ref.config)


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    ours = diffloom.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.mark.parametrize("name", NEW)
def test_stable_diffusion_pipeline_runs_like_diffusers(sd, name):
    ours, ref = sd
    ours = diffloom.StableDiffusionPipeline.from_pipe(ours, scheduler=getattr(diffloom, name).from_config(
        ours.scheduler.config))
    ref = diffusers.StableDiffusionPipeline.from_pipe(ref, scheduler=getattr(diffusers, name).from_config(
        ref.scheduler.config))
    assert type(ours.scheduler) is OURS[name]
    kwargs = dict(prompt="a photo of the red cat", num_inference_steps=4, height=tiny.IMAGE_HEIGHT,
                  width=tiny.IMAGE_WIDTH, output_type="np", eta=0.3)
    a = ours(**kwargs, generator=torch.Generator().manual_seed(0)).images
    b = ref(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4


@pytest.mark.parametrize("name", ["KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler"])
def test_img2img_pipeline_runs_like_diffusers(sd, name):
    extra = {"algorithm_type": "sde-dpmsolver++"} if name == "DPMSolverSinglestepScheduler" else {}
    ours = diffloom.StableDiffusionImg2ImgPipeline.from_pipe(sd[0], scheduler=getattr(diffloom, name).from_config(
        sd[0].scheduler.config, **extra))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(sd[1], scheduler=getattr(diffusers, name).from_config(
        sd[1].scheduler.config, **extra))
    kwargs = dict(prompt="a photo of the red cat", image=tiny.image(), strength=0.6, num_inference_steps=5,
                  output_type="np")
    a = ours(**kwargs, generator=torch.Generator().manual_seed(1)).images
    b = ref(**kwargs, generator=torch.Generator().manual_seed(1)).images
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4


# -- where diffloom differs on purpose ---------------------------------------------------------------------------

def _lambda(sigma: float) -> float:
    return -math.log(sigma)  # log(alpha / sigma) with alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha


def _first_block(cls, coefficients, seed=3):
    """Run a singlestep third-order block [1, 2, 3] on x0 predictions m(lambda) = a + b lambda + c lambda^2."""
    scheduler = cls(algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun", prediction_type="sample",
                    final_sigmas_type="sigma_min")
    scheduler.set_timesteps(6)
    assert list(scheduler.order_list[:3]) == [1, 2, 3]
    x_start = x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(scheduler.timesteps[:3]):
        lam = _lambda(scheduler.sigmas[i].item())
        x = scheduler.step(sum(c * lam**k for k, c in enumerate(coefficients)), t, x, generator=generator).prev_sample
    return x_start, x, scheduler.sigmas[0].item(), scheduler.sigmas[3].item()


def test_third_order_sde_block_integrates_a_quadratic_exactly():
    # From the block's start s to t (h = lambda_t - lambda_s), sde-dpmsolver++ is exact for x0(lambda) quadratic:
    # x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t int_0^h 2 e^{-2(h - u)} x0(lambda_s + u) du + noise, the noise
    # being sigma_t sqrt(1 - e^{-2h}) times the block's last draw. diffusers' D2 weight is off by -alpha_t.
    coefficients = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * 0.3
                    for k in range(3)]
    x_s, ours, sigma_s, sigma_t = _first_block(OURS["DPMSolverSinglestepScheduler"], coefficients)
    _, ref, _, _ = _first_block(diffusers.DPMSolverSinglestepScheduler, coefficients)
    alpha_s, alpha_t = 1 / math.sqrt(sigma_s**2 + 1), 1 / math.sqrt(sigma_t**2 + 1)
    lam_s, h = _lambda(sigma_s), _lambda(sigma_t) - _lambda(sigma_s)
    nodes, weights = np.polynomial.legendre.leggauss(30)
    u = 0.5 * h * (nodes + 1)
    integral = sum(0.5 * h * w * 2 * math.exp(-2 * (h - ui)) * sum(c * (lam_s + ui) ** k
                                                                  for k, c in enumerate(coefficients))
                   for ui, w in zip(u, weights))
    draws = torch.Generator().manual_seed(4)
    noise = [torch.randn(SHAPE, generator=draws, dtype=torch.float64) for _ in range(3)][-1]
    expected = (sigma_t * alpha_t / (sigma_s * alpha_s) * math.exp(-h) * x_s + alpha_t * integral
                + sigma_t * alpha_t * math.sqrt(1 - math.exp(-2 * h)) * noise)
    assert (ours - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert (ref - expected).abs().max() > 1e-2


def test_singlestep_dpmsolver_thresholds_with_the_current_step():
    # diffusers reads alpha_t[timestep] with timestep=None here and fails broadcasting a (1, T) tensor. The
    # first-order singlestep run is the first-order multistep run, which thresholds this way.
    config = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 1,
              "thresholding": True, "dynamic_thresholding_ratio": 0.9, "prediction_type": "v_prediction"}
    call = dict(set_kwargs={"num_inference_steps": 5}, strength=None, set_begin_index=True, dtype=torch.float32,
                step_kwargs={}, seed=0)
    with pytest.raises(RuntimeError):
        run(diffusers.DPMSolverSinglestepScheduler(**config), "", call)
    _, ours = run(OURS["DPMSolverSinglestepScheduler"](**config), "", call)
    _, multistep = run(diffloom.DPMSolverMultistepScheduler(**config), "", call)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(ours, multistep))


def test_singlestep_runs_do_not_rewrite_the_config():
    # 5 steps do not tile into second-order blocks, so that run ends on a shorter block. diffusers records that by
    # setting lower_order_final=True in the config, and a later 6-step run then also ends early; ours does not.
    config = {"final_sigmas_type": "sigma_min"}
    ours, ref = OURS["DPMSolverSinglestepScheduler"](**config), diffusers.DPMSolverSinglestepScheduler(**config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(5)
    assert ours.order_list == ref.order_list == [1, 2, 1, 2, 1]
    assert ours.config.lower_order_final is False and ref.config.lower_order_final is True
    fresh = diffusers.DPMSolverSinglestepScheduler(**config)
    for scheduler in (ours, fresh):
        scheduler.set_timesteps(6)
    assert ours.order_list == fresh.order_list == [1, 2, 1, 2, 1, 2]


def test_singlestep_add_noise_before_set_timesteps_uses_training_timesteps():
    # Before set_timesteps diffusers pairs timestep t with the sigma of 999 - t (its ladder runs the other way);
    # the forward process at t is sqrt(a_t) x0 + sqrt(1 - a_t) eps, as for the multistep solvers.
    scheduler = OURS["DPMSolverSinglestepScheduler"]()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    assert relative_error(scheduler.add_noise(x0, noise, timesteps), expected) <= 1e-6


@pytest.mark.parametrize("name", NEW)
def test_step_past_the_last_timestep_is_a_clear_error(name):
    scheduler = OURS[name]()
    scheduler.set_timesteps(2)
    x = torch.zeros(SHAPE)
    for t in scheduler.timesteps:
        scheduler.step(x, t, scheduler.scale_model_input(x, t))
    if name == "DDIMInverseScheduler":  # it steps by timestep value, not by position: no end to run past
        return
    with pytest.raises(ValueError, match="after the last of the .* timesteps; call set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)


def test_clear_errors_where_diffusers_fails_late():
    x = torch.zeros(SHAPE)
    for name in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        scheduler = OURS[name](prediction_type="sample")  # diffusers: NotImplementedError in step
        scheduler.set_timesteps(3)
        with pytest.raises(ValueError, match="prediction_type='sample' is not supported; use 'epsilon' or"):
            scheduler.step(x, scheduler.timesteps[0], x)
    tcd = OURS["TCDScheduler"]()
    tcd.set_timesteps(4)
    with pytest.raises(ValueError, match="eta=1.5; eta .gamma in the TCD paper. must lie in .0, 1."):
        tcd.step(x, tcd.timesteps[0], x, eta=1.5)  # diffusers: AssertionError
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver' is not supported by the singlestep"):
        OURS["DPMSolverSinglestepScheduler"](algorithm_type="sde-dpmsolver")
    inverse = OURS["DDIMInverseScheduler"](timestep_spacing="linspace")  # built, like diffusers; refused on use
    with pytest.raises(ValueError, match="timestep_spacing='linspace' is not supported by DDIM inversion"):
        inverse.set_timesteps(5)
    with pytest.raises(ValueError, match="integer timestep"):
        edm = OURS["EDMEulerScheduler"]()
        edm.set_timesteps(3)
        edm.step(x, 3, x)


def test_ddim_inverse_reads_the_deprecated_set_alpha_to_zero():
    # The option's old name: diffusers takes its value as set_alpha_to_one's, from arguments and from configs.
    for make in (lambda cls: cls(set_alpha_to_zero=False),
                 lambda cls: cls.from_config({**cls().config, "set_alpha_to_zero": False}),
                 lambda cls: cls.from_config(cls().config, set_alpha_to_zero=False)):
        ours, ref = make(OURS["DDIMInverseScheduler"]), make(diffusers.DDIMInverseScheduler)
        assert ours.initial_alpha_cumprod == ref.initial_alpha_cumprod == ref.alphas_cumprod[0]
        assert comparable(ours.config) == comparable(ref.config)
    with pytest.raises(TypeError, match=r"unexpected arguments \['set_alpha_to_two'\]"):
        OURS["DDIMInverseScheduler"](set_alpha_to_two=True)
