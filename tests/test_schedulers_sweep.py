"""A seeded random-config parity sweep of every built-in scheduler against diffusers, and one regression test for
each class of discrepancy such a sweep found.

The random sweep draws configs from the options diffusers' same-named class takes, runs set_timesteps (step
counts, custom timesteps/sigmas), an optional img2img start (add_noise + set_begin_index on a sliced schedule),
scale_model_input and step with seeded generators, in float32 and float16, and compares every step. It stays out
of the places where diffloom deliberately differs because diffusers fails there (NaN, IndexError, wrong sign);
test_schedulers_b.py pins those down.

Tolerance: float32 max error relative to max(1, |reference|) <= 1e-6 (most runs agree bit for bit); float16
<= 1e-3 (one half-precision ulp near 1).
"""

import importlib
import json
import logging
import random

import numpy as np
import pytest
import torch

import diffusers
from diffloom_schedulers import SCHEDULERS

# test_schedulers_more.py sweeps these with configs of their own
SWEPT_ELSEWHERE = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler",
                   "TCDScheduler", "EDMEulerScheduler", "DDIMInverseScheduler")
OURS = {name: getattr(importlib.import_module(f"diffloom_schedulers.{module}"), name)
        for name, module in SCHEDULERS.items() if name not in SWEPT_ELSEWHERE}
STOCHASTIC = {"DDPMScheduler", "DDIMScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler",
              "LCMScheduler", "DPMSolverMultistepScheduler"}
MULTISTEP = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")
SHAPE = (2, 4, 4, 4)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(autouse=True)
def quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("diffloom_schedulers").setLevel(logging.ERROR)


def fake_model(x, t, variance_type=None):
    """A smooth, deterministic stand-in denoiser (in float32 whatever the latent's dtype); with a learned
    variance the extra channels are the variance ("learned") or the interpolation weight in [-1, 1]."""
    out = torch.sin(0.7 * x.float() + float(t) / 300.0) * 0.8 + 0.1 * x.float()
    if variance_type == "learned":
        return torch.cat([out, 0.02 * torch.sigmoid(x.float())], dim=1)
    if variance_type == "learned_range":
        return torch.cat([out, torch.tanh(x.float())], dim=1)
    return out


def relative_error(ours, ref):
    """Max |ours - ref| over max(1, |ref|) on the finite entries; inf unless NaN and inf sit in the same places
    (half precision overflows, or a diffusers NaN that diffloom reproduces)."""
    ours, ref = ours.double(), ref.double()
    finite = torch.isfinite(ref)
    if not (torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.equal(ours[torch.isinf(ref)],
                                                                            ref[torch.isinf(ref)])):
        return float("inf")
    if not finite.any():
        return 0.0
    return (ours[finite] - ref[finite]).abs().max().item() / max(1.0, ref[finite].abs().max().item())


# -- random configs --------------------------------------------------------------------------------------------

def random_config(rng: random.Random, name: str) -> tuple[dict, int]:
    """A valid config for ``name``, outside the regions where diffusers fails (see the module docstring)."""
    T = rng.choice([1000, 1000, 100, 37])
    c = {"num_train_timesteps": T} if T != 1000 else {}
    schedules = ["linear", "scaled_linear", "squaredcos_cap_v2"] + (["sigmoid", "laplace"] if name == "DDPMScheduler"
                                                                   else ["exp"] if name == "HeunDiscreteScheduler"
                                                                   else [])
    c["beta_schedule"] = rng.choice(schedules)
    if rng.random() < 0.5:
        c["beta_start"], c["beta_end"] = rng.choice([(0.00085, 0.012), (0.0005, 0.03)])
    if rng.random() < 0.1:
        c["trained_betas"] = np.linspace(2e-4, 0.02, T).tolist()
    c["prediction_type"] = rng.choice(["epsilon", "v_prediction"] if name in ("PNDMScheduler",
                                                                             "EulerAncestralDiscreteScheduler")
                                      else ["epsilon", "v_prediction", "sample"])
    c["timestep_spacing"] = rng.choice(["leading", "trailing", "linspace"])
    c["steps_offset"] = rng.choice([0, 0, 1, 2])

    def thresholding():
        if rng.random() < 0.25:
            c.update(thresholding=True, dynamic_thresholding_ratio=rng.choice([0.995, 0.9]),
                     sample_max_value=rng.choice([1.0, 1.5]))

    def respacing(options=("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        if rng.random() < 0.45:
            c[rng.choice(options)] = True

    if name in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler"):
        c["clip_sample"] = rng.random() < 0.4
        c["rescale_betas_zero_snr"] = rng.random() < 0.2
        thresholding()
    if name == "DDPMScheduler":
        # (not "fixed_large_log": diffusers takes the square root of that log variance, NaN in both libraries)
        c["variance_type"] = rng.choice(["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range",
                                         None])
    if name in ("DDIMScheduler", "PNDMScheduler", "LCMScheduler"):
        c["set_alpha_to_one"] = rng.random() < 0.5
    if name == "PNDMScheduler":
        c["skip_prk_steps"] = rng.random() < 0.6
    if name == "LCMScheduler":
        c["original_inference_steps"] = min(rng.choice([50, 20, 100]), T)
        c["timestep_scaling"] = rng.choice([10.0, 5.0])
    if name == "EulerDiscreteScheduler":
        c["interpolation_type"] = rng.choice(["linear", "linear", "log_linear"])
        respacing()
        if rng.random() < 0.2:
            c["sigma_min"] = 0.05
        if rng.random() < 0.2:
            c["sigma_max"] = 20.0
        c["timestep_type"] = rng.choice(["discrete", "continuous"])
        c["final_sigmas_type"] = rng.choice(["zero", "sigma_min"])
        c["rescale_betas_zero_snr"] = rng.random() < 0.2
    if name == "EulerAncestralDiscreteScheduler":
        c["rescale_betas_zero_snr"] = rng.random() < 0.2
    if name == "HeunDiscreteScheduler":
        respacing()
        c["clip_sample"] = rng.random() < 0.3
    if name == "LMSDiscreteScheduler":
        respacing()
    if name in MULTISTEP:
        thresholding()
        c["solver_order"] = rng.choice([1, 2, 2] + ([3] if name != "DEISMultistepScheduler" else []))
        c["lower_order_final"] = rng.random() < 0.7
        flow = rng.random() < 0.15
        if flow:
            c.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=rng.choice([1.0, 3.0]))
        else:
            respacing(("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
                      + (("use_lu_lambdas",) if name == "DPMSolverMultistepScheduler" else ()))
    if name == "DPMSolverMultistepScheduler":
        algorithms = ["dpmsolver++", "sde-dpmsolver++"] + ([] if c.get("use_flow_sigmas") else
                                                          ["dpmsolver", "sde-dpmsolver"])
        c["algorithm_type"] = rng.choice(algorithms)
        if c["algorithm_type"].startswith("sde-"):
            c["solver_order"] = min(c["solver_order"], 2)  # third-order SDE steps: diffusers' sign error / crash
        c["solver_type"] = rng.choice(["midpoint", "heun"])
        c["euler_at_final"] = rng.random() < 0.2
        c["final_sigmas_type"] = ("zero" if c.get("use_flow_sigmas") else
                                  "sigma_min" if c["algorithm_type"] in ("dpmsolver", "sde-dpmsolver")
                                  else rng.choice(["zero", "sigma_min"]))
        c["rescale_betas_zero_snr"] = rng.random() < 0.15
    if name == "UniPCMultistepScheduler":
        c["predict_x0"] = c.get("use_flow_sigmas") or rng.random() < 0.8
        c["solver_type"] = rng.choice(["bh1", "bh2", "bh2"])
        if rng.random() < 0.2:
            c["disable_corrector"] = [0]
        c["final_sigmas_type"] = rng.choice(["zero", "sigma_min"])
        if c["final_sigmas_type"] == "zero":
            c["lower_order_final"] = True  # else diffusers' last step into sigma = 0 is singular or inf
        c["rescale_betas_zero_snr"] = rng.random() < 0.15
    if c.get("rescale_betas_zero_snr"):
        c["prediction_type"] = "v_prediction"  # zero terminal SNR leaves nothing to read eps or x0 from at t = T - 1
    return c, T


def random_call(rng: random.Random, name: str, config: dict, T: int) -> dict:
    """set_timesteps arguments, img2img strength (or None), dtype, step kwargs and a seed."""
    # (step counts near T give the multistep solvers repeated timesteps: NaN in both libraries)
    steps = rng.choice([1, 2, 3, 4, 7, 10, 13, 25] + ([T - 1, T] if T <= 100 and name not in MULTISTEP else []))
    set_kwargs = {"num_inference_steps": steps}
    if name in ("DDPMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LCMScheduler",
                "DPMSolverMultistepScheduler") and rng.random() < 0.15:
        if not any(config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                             "use_lu_lambdas", "use_flow_sigmas")) \
                and not (name == "EulerDiscreteScheduler" and config.get("timestep_type") == "continuous"):
            set_kwargs = {"timesteps": sorted(rng.sample(range(T), min(rng.randint(2, 8), T)), reverse=True)}
    elif name == "EulerDiscreteScheduler" and rng.random() < 0.15:
        set_kwargs = {"sigmas": sorted((rng.uniform(0.05, 12.0) for _ in range(rng.randint(1, 6))), reverse=True)
                      + [0.0]}
    if name == "LCMScheduler" and "num_inference_steps" in set_kwargs:
        set_kwargs["num_inference_steps"] = min(steps, config.get("original_inference_steps", 50))
        if rng.random() < 0.3:
            set_kwargs["strength"] = rng.choice([0.5, 1.0])
    if name == "PNDMScheduler" and not config.get("skip_prk_steps"):
        set_kwargs["num_inference_steps"] = max(steps, 4)
    step_kwargs = {}
    if name == "DDIMScheduler":
        step_kwargs = {"eta": rng.choice([0.0, 0.5, 1.0]), "use_clipped_model_output": rng.random() < 0.3}
    if name == "EulerDiscreteScheduler" and rng.random() < 0.3:
        step_kwargs = {"s_churn": 1.0, "s_tmin": 0.1, "s_tmax": 50.0, "s_noise": 1.003}
    if name == "LMSDiscreteScheduler":
        step_kwargs = {"order": rng.choice([4, 2, 3])}
    img2img = rng.random() < 0.3 and (name != "PNDMScheduler" or config.get("skip_prk_steps"))
    return dict(set_kwargs=set_kwargs, strength=rng.choice([0.3, 0.6, 0.9]) if img2img else None,
                set_begin_index=rng.random() < 0.7, dtype=torch.float16 if rng.random() < 0.15 else torch.float32,
                step_kwargs=step_kwargs, seed=rng.randint(0, 10**6))


def run(scheduler, name, config, call):
    """The loop a pipeline runs: every tensor the scheduler hands back, in order."""
    scheduler.set_timesteps(**call["set_kwargs"])
    record = {"timesteps": scheduler.timesteps, "init_noise_sigma": torch.as_tensor(scheduler.init_noise_sigma)}
    if hasattr(scheduler, "sigmas"):
        record["sigmas"] = scheduler.sigmas
    timesteps, begin = scheduler.timesteps, 0
    generator = torch.Generator().manual_seed(call["seed"])
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    if call["strength"] is not None:  # img2img, as the pipelines slice it
        n = scheduler.num_inference_steps or len(timesteps)
        begin = max(n - min(int(n * call["strength"]), n), 0) * scheduler.order
        timesteps = timesteps[begin:]
    # Pipelines fix the start; without it, repeated timesteps (few training steps, flow sigmas) are ambiguous,
    # so runs over those always fix it.
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
        kwargs = dict(call["step_kwargs"])
        if name in STOCHASTIC:
            kwargs["generator"] = step_generator
        out = scheduler.step(fake_model(model_input, t, config.get("variance_type")).to(call["dtype"]), t, x,
                              **kwargs)
        steps.append((model_input, out.prev_sample, getattr(out, "pred_original_sample", None)))
        x = out.prev_sample
    return record, steps


def assert_same(name, config, call):
    what = f"{name} {json.dumps({k: v for k, v in config.items() if k != 'trained_betas'})} {call}"
    try:
        ref_record, ref_steps = run(getattr(diffusers, name)(**config), name, config, call)
    except (ValueError, IndexError) as error:  # e.g. "leading" + steps_offset past the last training step
        with pytest.raises(ValueError):
            run(OURS[name](**config), name, config, call)
        return error
    ours_record, ours_steps = run(OURS[name](**config), name, config, call)
    for key, ref in ref_record.items():
        ours = ours_record[key]
        assert ours.shape == ref.shape, f"{what}: {key} shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
        assert relative_error(ours, ref) <= 1e-6, f"{what}: {key} differs"
    assert ours_record["timesteps"].dtype == ref_record["timesteps"].dtype, f"{what}: timesteps dtype"
    tolerance = 1e-3 if call["dtype"] == torch.float16 else 1e-6
    assert len(ours_steps) == len(ref_steps)
    sigmas = ref_record.get("sigmas")
    zero_length = sigmas is not None and bool((sigmas[1:] == sigmas[:-1]).any())
    for i, (ours, ref) in enumerate(zip(ours_steps, ref_steps)):
        if name in MULTISTEP and (i == len(ref_steps) - 1 or zero_length) and not torch.isfinite(ref[1]).all():
            # diffusers' multistep solvers give NaN or inf stepping into sigma = 0 or over a zero-length step (a
            # repeated sigma); diffloom's step there is the exact one (test_schedulers_b.py)
            break
        assert ours[1].dtype == ref[1].dtype, f"{what}: step {i} dtype"
        for label, a, b in (("model input", ours[0], ref[0]), ("prev_sample", ours[1], ref[1]),
                            ("pred_original_sample", ours[2], ref[2])):
            if b is not None:
                error = relative_error(a, b)
                assert error <= tolerance, f"{what}: step {i} {label} error {error:.3g}"


RANDOM_CASES = []
for _name in OURS:
    _rng = random.Random(f"sweep-{_name}")
    for _k in range(30):
        _config, _T = random_config(_rng, _name)
        RANDOM_CASES.append(pytest.param(_name, _config, random_call(_rng, _name, _config, _T),
                                         id=f"{_name.replace('Scheduler', '')}-{_k}"))


@pytest.mark.parametrize("name,config,call", RANDOM_CASES)
def test_random_config_matches_diffusers(name, config, call):
    assert_same(name, config, call)


# -- regressions: one test per discrepancy class the sweep found -----------------------------------------------

def loop_error(name, config, steps=25, dtype=torch.float32, stochastic=False):
    """Max relative error of a plain sampling loop against diffusers."""
    call = dict(set_kwargs={"num_inference_steps": steps}, strength=None, set_begin_index=True, dtype=dtype,
                step_kwargs={}, seed=3)
    _, ours = run(OURS[name](**config), name if stochastic else "", config, call)
    _, ref = run(getattr(diffusers, name)(**config), name if stochastic else "", config, call)
    return max(relative_error(a[1], b[1]) for a, b in zip(ours, ref))


@pytest.mark.parametrize("name,config", [
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver",
                                     "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min", "solver_order": 3}),
    ("DEISMultistepScheduler", {}),
    ("DEISMultistepScheduler", {"solver_order": 1, "prediction_type": "v_prediction", "thresholding": True,
                                "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_multistep_scalars_round_like_diffusers(name, config, dtype):
    # Was: Python-float / float64 coefficients, 4e-7..3.5e-5 off in float32 and up to 0.25 in float16 (a 0-d
    # float32 tensor times a half tensor computes in half, a Python float does not). Now 0-d float32 scalars in
    # the reference's order: these agree bit for bit.
    stochastic = config.get("algorithm_type", "").startswith("sde")
    assert loop_error(name, config, dtype=dtype, stochastic=stochastic) == 0.0


def test_ill_conditioned_cosine_start_matches():
    # At t = 999 of the cosine schedule sigma is 2e4 and the first update cancels to 1 part in 1e4: the result is
    # float32 rounding, which only the same order of operations reproduces (was 5e-3 off).
    config = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "predict_x0": False,
              "final_sigmas_type": "sigma_min", "solver_order": 1}
    assert loop_error("UniPCMultistepScheduler", config, steps=3) == 0.0


def test_unipc_noise_prediction_ignores_thresholding_like_diffusers():
    # diffusers thresholds only UniPC's data prediction; we clipped the noise prediction's x0 too (error 1.1).
    config = {"predict_x0": False, "thresholding": True, "dynamic_thresholding_ratio": 0.5,
              "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}
    assert loop_error("UniPCMultistepScheduler", config, steps=5) <= 1e-6


@pytest.mark.parametrize("config,steps,order", [
    ({"use_karras_sigmas": True, "timestep_spacing": "trailing", "prediction_type": "sample"}, 200, 3),
    ({"use_beta_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.0005, "beta_end": 0.03,
      "prediction_type": "v_prediction"}, 10, 4),
    ({"num_train_timesteps": 50, "use_beta_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}, 20, 4),
])
def test_lms_weights_follow_scipy_quad_on_the_float32_integrand(config, steps, order):
    # diffusers integrates the Lagrange basis with scipy's quad on a float32 integrand (tau rounded to float32
    # before tau - sigma_k), which loses up to 1e-4 where sigmas crowd; exact weights were 3e-5..6e-5 off.
    ours, ref = OURS["LMSDiscreteScheduler"](**config), diffusers.LMSDiscreteScheduler(**config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    weights = [(ours.get_lms_coefficient(min(t + 1, order), t, j), ref.get_lms_coefficient(min(t + 1, order), t, j))
               for t in range(steps) for j in range(min(t + 1, order))]
    assert sum(a == b for a, b in weights) >= 0.99 * len(weights)  # QUADPACK's rare subdivided cases: exact
    call = dict(set_kwargs={"num_inference_steps": steps}, strength=None, set_begin_index=True,
                dtype=torch.float32, step_kwargs={"order": order}, seed=3)
    _, ours_steps = run(OURS["LMSDiscreteScheduler"](**config), "", config, call)
    _, ref_steps = run(diffusers.LMSDiscreteScheduler(**config), "", config, call)
    assert max(relative_error(a[1], b[1]) for a, b in zip(ours_steps, ref_steps)) <= 1e-6


def test_lms_step_over_a_repeated_sigma():
    # "leading" with steps_offset=2 over all 100 training steps starts at timesteps 101, 100: both clamp to the
    # top sigma. quad returns 0 for the empty interval; our quadrature divided by the zero node gap (NaN).
    config = {"num_train_timesteps": 100, "timestep_spacing": "leading", "steps_offset": 2}
    call = dict(set_kwargs={"num_inference_steps": 100}, strength=None, set_begin_index=False, dtype=torch.float32,
                step_kwargs={"order": 2}, seed=0)
    assert_same("LMSDiscreteScheduler", config, call)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DEISMultistepScheduler"])
@pytest.mark.parametrize("option", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_sigma_bounds_carried_from_an_euler_config(name, option):
    # A config converted from Euler keeps sigma_min / sigma_max as hidden keys, and diffusers' DPM-Solver and
    # DEIS re-space between them; we used the training range (sigmas off by up to 137).
    source = {option: True, "sigma_min": 0.1, "sigma_max": 20.0}
    ours = OURS[name].from_config(OURS["EulerDiscreteScheduler"](**source).config)
    ref = getattr(diffusers, name).from_config(diffusers.EulerDiscreteScheduler(**source).config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(6)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas[0].item() == pytest.approx(20.0)


def test_sigma_to_t_on_a_zero_terminal_snr_ladder():
    # Zero terminal SNR raises alpha_bar[-1] to 2^-24, above alpha_bar[-2]: the ladder dips just below its top.
    # diffusers takes the last training step whose log sigma does not exceed the value; a bisection picked
    # 1991 instead of 1999 (a sample error of 0.029).
    config = {"num_train_timesteps": 2000, "beta_schedule": "scaled_linear", "use_lu_lambdas": True,
              "rescale_betas_zero_snr": True, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
    ours, ref = OURS["DPMSolverMultistepScheduler"](**config), diffusers.DPMSolverMultistepScheduler(**config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(4)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps[0] == 1999
    assert loop_error("DPMSolverMultistepScheduler", config, steps=4) == 0.0


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DEISMultistepScheduler"])
def test_img2img_start_on_a_repeated_timestep_without_begin_index(name):
    # Flow sigmas over 100 training steps repeat timesteps ([99, 99, 98, 97, 97, ...]). An img2img run that
    # starts at entry 4 (the second 97) without set_begin_index: diffusers takes the second occurrence, which is
    # right here; we took the first and ran one step short (error 0.02). A fresh run still starts at entry 0.
    config = {"num_train_timesteps": 100, "use_flow_sigmas": True, "prediction_type": "flow_prediction",
              "flow_shift": 3.0}
    results = []
    for cls in (OURS[name], getattr(diffusers, name)):
        scheduler = cls(**config)
        scheduler.set_timesteps(60)
        assert scheduler.timesteps[3] == scheduler.timesteps[4]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        x = scheduler.add_noise(torch.zeros(SHAPE), x, scheduler.timesteps[4:5].repeat(SHAPE[0]))
        for t in scheduler.timesteps[4:]:
            x = scheduler.step(fake_model(x, t), t, x).prev_sample
        results.append(x)
    assert torch.equal(results[0], results[1])
    fresh = OURS[name](**config)
    fresh.set_timesteps(60)
    fresh.step(fake_model(x, fresh.timesteps[0]), fresh.timesteps[0], x)
    assert fresh.step_index == 1


def test_step_past_the_last_timestep_is_a_clear_error():
    # diffusers fails there with IndexError (AssertionError for UniPC); it is also where an img2img run that
    # starts on the first of two equal timesteps ends up.
    for name in ("EulerDiscreteScheduler", "LMSDiscreteScheduler", *MULTISTEP):
        scheduler = OURS[name]()
        scheduler.set_timesteps(2)
        x = torch.zeros(SHAPE)
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            scheduler.step(x, t, x)
        with pytest.raises(ValueError, match="after the last of the 2 timesteps.*set_timesteps"):
            scheduler.step(x, scheduler.timesteps[-1], x)


@pytest.mark.parametrize("name", ["DDPMScheduler", "HeunDiscreteScheduler"])
def test_trailing_spacing_keeps_the_requested_step_count(name):
    # T=100, 31 steps, "trailing": rounding lays out 32 timesteps. diffusers keeps num_inference_steps=31 (Heun
    # also re-spaces Karras sigmas to 31); we counted 32 (Heun: 63 timesteps instead of 61).
    config = {"num_train_timesteps": 100, "timestep_spacing": "trailing"}
    if name == "HeunDiscreteScheduler":
        config["use_karras_sigmas"] = True
    ours, ref = OURS[name](**config), getattr(diffusers, name)(**config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(31)
    assert ours.num_inference_steps == ref.num_inference_steps == 31
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert loop_error(name, config, steps=31, stochastic=True) == 0.0


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"])
def test_leading_offset_past_the_last_training_step_is_a_clear_error(name):
    # 100 steps over 100 training steps with steps_offset=2 put the first timestep at 101. These schedulers index
    # alpha_bar by timestep: stepping there, diffusers fails with IndexError (we did too); an img2img run that
    # starts lower works in both. (Sigma schedulers interpolate and run.)
    config = {"num_train_timesteps": 100, "steps_offset": 2}
    config.update({"skip_prk_steps": True} if name == "PNDMScheduler" else {})
    kwargs = {"generator": torch.Generator()} if name == "DDPMScheduler" else {}
    x = torch.zeros(SHAPE)
    reference, ours = getattr(diffusers, name)(**config), OURS[name](**config)
    for scheduler in (reference, ours):
        scheduler.set_timesteps(100)
    with pytest.raises(IndexError):
        reference.step(x, reference.timesteps[0], x, **kwargs)
    with pytest.raises(ValueError, match="timestep 101 is past the last training step 99 .steps_offset=2"):
        ours.step(x, ours.timesteps[0], x, **kwargs)
    call = dict(set_kwargs={"num_inference_steps": 100}, strength=0.5, set_begin_index=True, dtype=torch.float32,
                step_kwargs={}, seed=0)
    assert_same(name, config, call)


def test_dpm_refuses_deis_name_with_final_sigma_zero_like_diffusers():
    # diffusers checks algorithm_type='deis' against final_sigmas_type='zero' before reading it as dpmsolver++.
    with pytest.raises(ValueError):
        diffusers.DPMSolverMultistepScheduler(algorithm_type="deis")
    with pytest.raises(ValueError, match="algorithm_type='deis'.*final_sigmas_type='sigma_min'"):
        OURS["DPMSolverMultistepScheduler"](algorithm_type="deis")
    ours = OURS["DPMSolverMultistepScheduler"](algorithm_type="deis", final_sigmas_type="sigma_min")
    assert ours.config.algorithm_type == "dpmsolver++"
    # a DEIS config whose algorithm_type took its default still converts, in both libraries
    converted = OURS["DPMSolverMultistepScheduler"].from_config(OURS["DEISMultistepScheduler"]().config)
    assert converted.config.algorithm_type == "dpmsolver++"


def test_dpm_lambda_min_clipped_that_leaves_nothing_is_a_clear_error():
    # Every training step has lambda below 5: diffusers lays out timestep -1 and fails with IndexError mid-run.
    with pytest.raises(IndexError):
        scheduler = diffusers.DPMSolverMultistepScheduler(lambda_min_clipped=5.0)
        scheduler.set_timesteps(5)
        x = torch.zeros(SHAPE)
        for t in scheduler.timesteps:
            x = scheduler.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="lambda_min_clipped=5.0 .* smaller lambda_min_clipped"):
        OURS["DPMSolverMultistepScheduler"](lambda_min_clipped=5.0).set_timesteps(5)


def test_sde_step_up_in_noise_is_a_clear_error():
    # Flow sigmas with final_sigmas_type='sigma_min' end on the VP schedule's smallest sigma, above the last
    # flow sigma; the SDE noise variance is then negative. diffusers returns NaN, we raised "math domain error".
    config = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "algorithm_type": "sde-dpmsolver++",
              "final_sigmas_type": "sigma_min", "solver_order": 1}
    outputs = []
    for cls in (OURS["DPMSolverMultistepScheduler"], diffusers.DPMSolverMultistepScheduler):
        scheduler = cls(**config)
        scheduler.set_timesteps(200)  # the last flow sigma, about 1 / 200, lies below sigma_min = 0.01
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(1)
        try:
            for t in scheduler.timesteps:
                x = scheduler.step(fake_model(x, t), t, x, generator=generator).prev_sample
            outputs.append(x)
        except ValueError as error:
            outputs.append(error)
    assert isinstance(outputs[0], ValueError) and "final_sigmas_type='zero'" in str(outputs[0])
    assert torch.isnan(outputs[1]).all()


# -- configs: conversions, folders with unknown keys, compatibles ----------------------------------------------

def comparable(config):
    config = json.loads(json.dumps(dict(config), default=str))
    config.pop("_diffusers_version", None)
    if "_use_default_values" in config:
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


def test_random_from_config_round_trips_match_diffusers():
    rng = random.Random("from_config")
    for _ in range(12):
        source = rng.choice(list(OURS))
        config, _ = random_config(rng, source)
        config.pop("trained_betas", None)
        ours_source, ref_source = OURS[source](**config), getattr(diffusers, source)(**config)
        for target in OURS:
            what = f"{source} {config} -> {target}"
            try:
                ref = getattr(diffusers, target).from_config(ref_source.config)
            except (ValueError, NotImplementedError):  # e.g. DEIS from an SDE DPM-Solver config
                with pytest.raises(ValueError):
                    OURS[target].from_config(ours_source.config)
                continue
            ours = OURS[target].from_config(ours_source.config)
            assert comparable(ours.config) == comparable(ref.config), what
            # each library reads the other's in-memory config the same way
            assert comparable(OURS[target].from_config(dict(ref_source.config)).config) == comparable(ours.config)
            try:
                ref.set_timesteps(7)
            except ValueError:  # e.g. LCM's original_inference_steps above a small num_train_timesteps
                with pytest.raises(ValueError):
                    ours.set_timesteps(7)
                continue
            ours.set_timesteps(7)
            assert torch.equal(ours.timesteps, ref.timesteps), what
            if hasattr(ref, "sigmas"):
                assert torch.equal(ours.sigmas, ref.sigmas), what


@pytest.mark.parametrize("name", list(OURS))
def test_folder_with_unknown_keys_loads_like_diffusers(name, tmp_path):
    getattr(diffusers, name)(num_train_timesteps=100).save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    data = json.loads(path.read_text())
    data.update({"some_future_option": 3, "_private_note": "x", "skip_prk_steps": True, "sigma_max": 14.6})
    path.write_text(json.dumps(data))
    ours, ref = OURS[name].from_pretrained(tmp_path), getattr(diffusers, name).from_pretrained(tmp_path)
    assert comparable(ours.config) == comparable(ref.config)
    ours.save_pretrained(tmp_path / "again")
    again = getattr(diffusers, name).from_pretrained(tmp_path / "again")
    assert comparable(again.config) == comparable(ref.config)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(5)
    assert torch.equal(ours.timesteps, ref.timesteps)


@pytest.mark.parametrize("name", list(OURS))
def test_compatibles_match_diffusers(name):
    ours = sorted(cls.__name__ for cls in OURS[name]().compatibles)
    ref = sorted(cls.__name__ for cls in getattr(diffusers, name)().compatibles if cls.__name__ in SCHEDULERS)
    assert ours == ref
