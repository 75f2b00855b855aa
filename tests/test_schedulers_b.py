"""Multistep solvers (DPM-Solver(++), UniPC, DEIS) against diffusers, plus the places where we differ on purpose.

Every parity test runs a full sampling loop on (2, 4, 8, 8) latents with a deterministic fake model and compares
each intermediate sample. Tolerance: 1e-5, relative to the result's size once that exceeds 1 (the noise-prediction
SDE with 4 steps ends in the hundreds, where one float32 ulp is already 3e-5).

Where diffusers 0.42.1 is wrong, the tests below say why and check a mathematically justified value instead:
  * UniPC stepping to sigma = 0 (the default) with bh1, or with lower_order_final=False: NaN/inf/crash.
  * sde-dpmsolver++ third order: the D2 weight has the wrong sign on its 1/2 term; sde-dpmsolver third order
    raises UnboundLocalError.
  * a Karras ladder that ends on sigma_min repeats its last sigma; the zero-length third-order step is NaN.
  * a Karras ladder on the cosine schedule starts with a repeated timestep, so a run without set_begin_index
    starts at its second entry and steps past the end.
  * add_noise before set_timesteps reads the sigma ladder backwards.
"""

import inspect
import json
import math

import numpy as np
import pytest
import torch

import diffusers
from diffloom_schedulers.deis_multistep import DEISMultistepScheduler
from diffloom_schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from diffloom_schedulers.unipc_multistep import UniPCMultistepScheduler

# diffusers deprecates the non-++ DPM variants and trips NumPy 2 deprecations; neither is ours to see
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

OURS = {
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "DEISMultistepScheduler": DEISMultistepScheduler,
}
SHAPE = (2, 4, 8, 8)
TRAIN_ALPHA_BAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def fake_model(prediction_type):
    """A smooth stand-in denoiser: the ideal one for Gaussian data (std 0.5) plus a small nonlinear term.

    It is written as an x0 estimate and re-expressed in the requested parametrisation, so every prediction type
    sees values of the size a real model gives.
    """

    def model(x, t):
        alpha_bar = TRAIN_ALPHA_BAR[min(max(int(t), 0), 999)].item()
        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        x0 = alpha * 0.25 * x / (0.25 * alpha_bar + 1 - alpha_bar) + 0.1 * torch.sin(x + float(t) / 500)
        eps = (x - alpha * x0) / sigma
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0,
                "flow_prediction": eps - x0}[prediction_type]

    return model


def sample_loop(scheduler, config, n, set_kwargs=None, noise_seed=None, dtype=torch.float32, upto=None):
    """Run the loop; return every intermediate sample. ``noise_seed`` seeds the SDE variants' generator."""
    scheduler.set_timesteps(n, **(set_kwargs or {})) if n is not None else scheduler.set_timesteps(**set_kwargs)
    model = fake_model(config.get("prediction_type", "epsilon"))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    step_kwargs = {}
    if noise_seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(noise_seed)
    samples = []
    for t in scheduler.timesteps[:upto]:
        x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
        samples.append(x)
    return samples


def reference_loop(name, config, n, **kwargs):
    return sample_loop(getattr(diffusers, name)(**config), config, n, **kwargs)


def float64_reference_loop(name, config, n):
    """diffusers' own algorithm with every scalar and tensor in float64."""
    scheduler = getattr(diffusers, name)(**config)
    scheduler.set_timesteps(n)
    scheduler.sigmas = scheduler.sigmas.double()
    return sample_loop_prepared(scheduler, config, torch.float64)


def sample_loop_prepared(scheduler, config, dtype):
    model = fake_model(config.get("prediction_type", "epsilon"))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(dtype)
    samples = []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
        samples.append(x)
    return samples


def assert_close(ours, reference, what=""):
    ours, reference = ours.double(), reference.double()
    tolerance = 1e-5 * max(1.0, reference.abs().max().item())
    error = (ours - reference).abs().max().item()
    assert error <= tolerance, f"{what}: max abs error {error:.3g} > {tolerance:.3g}"


def assert_same_run(name, config, n, set_kwargs=None, noise_seed=None, compare_steps=None):
    ours_scheduler, ref_scheduler = OURS[name](**config), getattr(diffusers, name)(**config)
    ours = sample_loop(ours_scheduler, config, n, set_kwargs, noise_seed)
    ref = sample_loop(ref_scheduler, config, n, set_kwargs, noise_seed, upto=compare_steps)
    assert torch.equal(ours_scheduler.timesteps, ref_scheduler.timesteps)
    assert torch.allclose(ours_scheduler.sigmas, ref_scheduler.sigmas, rtol=1e-6, atol=0)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, f"{name} {config} n={n} step {i}")
    return ours, ref


STEPS = [1, 4, 25]

# -- DPM-Solver ------------------------------------------------------------------------------------------------

DPM_GRID = []
for _algo in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"):
    for _order, _solver in ((1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")):
        _cfg = {"algorithm_type": _algo, "solver_order": _order, "solver_type": _solver}
        if _algo in ("dpmsolver", "sde-dpmsolver"):
            _cfg["final_sigmas_type"] = "sigma_min"  # the noise-prediction variants cannot end at sigma = 0
        DPM_GRID.append(_cfg)

DPM_EXTRA = [
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "solver_order": 3, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    {"use_lu_lambdas": True},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "solver_order": 3},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.2},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True,
     "prediction_type": "v_prediction"},
    {"final_sigmas_type": "sigma_min"},
    {"lower_order_final": False},
    {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
     "steps_offset": 1},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
    {"algorithm_type": "deis", "solver_type": "logrho", "final_sigmas_type": "sigma_min"},  # a DEIS config
]


def _dpm_compare_steps(config, n):
    """The SDE variants' third-order steps are where diffusers is wrong (see test_sde_third_order_*)."""
    third_order = config.get("solver_order") == 3 and n >= 5
    if third_order and config.get("algorithm_type", "").startswith("sde-"):
        return 2  # steps 0 and 1 warm up with orders 1 and 2
    return None


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("config", DPM_GRID + DPM_EXTRA, ids=lambda c: json.dumps(c, sort_keys=True))
def test_dpmsolver_matches_diffusers(config, n):
    seed = 7 if config.get("algorithm_type", "").startswith("sde-") else None
    assert_same_run("DPMSolverMultistepScheduler", config, n, noise_seed=seed,
                    compare_steps=_dpm_compare_steps(config, n))


def test_dpmsolver_custom_timesteps_and_dynamic_shift():
    assert_same_run("DPMSolverMultistepScheduler", {}, None,
                    set_kwargs={"timesteps": [999, 800, 611, 400, 250, 90, 10]})
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_dynamic_shifting": True}
    assert_same_run("DPMSolverMultistepScheduler", flow, 6, set_kwargs={"mu": 0.5})
    # mu shapes only that run: the next one without mu is back to flow_shift (diffusers writes exp(mu) into
    # its config and keeps it)
    ours = DPMSolverMultistepScheduler(**flow)
    ours.set_timesteps(6, mu=0.5)
    ours.set_timesteps(6)
    plain = DPMSolverMultistepScheduler(**flow)
    plain.set_timesteps(6)
    assert torch.equal(ours.sigmas, plain.sigmas)


def test_dpmsolver_sde_variance_noise_and_return_tuple():
    config = {"algorithm_type": "sde-dpmsolver++"}
    ours, ref = DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    model = fake_model("epsilon")
    noises = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(3))
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    for t, noise in zip(ours.timesteps, noises):
        (x,) = ours.step(model(x, t), t, x, variance_noise=noise, return_dict=False)
        y = ref.step(model(y, t), t, y, variance_noise=noise).prev_sample
    assert_close(x, y, "variance_noise")


def test_dpmsolver_learned_variance_keeps_the_mean_channels():
    config = {"variance_type": "learned_range"}
    ours, ref = DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    model = fake_model("epsilon")
    x = y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours.set_timesteps(5)
    ref.set_timesteps(5)
    for t in ours.timesteps:
        x = ours.step(torch.cat([model(x, t), torch.ones_like(x)], 1), t, x).prev_sample
        y = ref.step(torch.cat([model(y, t), torch.ones_like(y)], 1), t, y).prev_sample
    assert_close(x, y, "learned variance, 3 channels")
    # diffusers keeps channels [:3] whatever the image has; the mean is the first half (here 4 latent channels)
    latents = DPMSolverMultistepScheduler(**config)
    plain = DPMSolverMultistepScheduler()
    latents.set_timesteps(5)
    plain.set_timesteps(5)
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for t in plain.timesteps:
        x = latents.step(torch.cat([model(x, t), torch.ones_like(x)], 1), t, x).prev_sample
        y = plain.step(model(y, t), t, y).prev_sample
    assert torch.equal(x, y)


def test_dpmsolver_keeps_the_model_dtype():
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(3)
    x = torch.randn(SHAPE).to(torch.bfloat16)
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model("epsilon")(x.float(), t).to(torch.bfloat16), t, x).prev_sample
        assert x.dtype == torch.bfloat16


# -- the third-order SDE steps ---------------------------------------------------------------------------------
#
# Multistep third order fits the last three outputs m(lambda) with a quadratic and integrates it against the
# variant's kernel. With the published D1, D2 and weights J_k(z) = z phi_{k+1}(z), the polynomial integrated
# is p(u) = m(s) + u m'(s) + u^2 m''(s) / 4 (u = lambda - lambda_s; the DPM-Solver-3M convention, which
# diffusers' ODE steps follow). So for an m that is exactly quadratic in lambda, one step of each variant must
# equal  linear * x_s + integral_0^h kernel(u) p(u) du,  computed here by Gauss-Legendre quadrature.
# diffusers' sde-dpmsolver++ misses this: its D2 weight is (1 - e^{-2h} - 2h) / (2h)^2 - 1/2, which tends to
# -1 instead of 0 as h -> 0; the correct one (also k-diffusion's sample_dpmpp_3m_sde) has + 1/2.

def _quadratic_third_step(scheduler, coefficients):
    scheduler.set_timesteps(25)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for i, t in enumerate(scheduler.timesteps[:3]):
        lam = _lambda(scheduler.sigmas[i].item())
        prediction = sum(c * lam**k for k, c in enumerate(coefficients)).float()
        x_in = x
        x = scheduler.step(prediction, t, x, variance_noise=torch.zeros_like(x)).prev_sample
    return x_in.double(), x.double(), scheduler.sigmas[2].item(), scheduler.sigmas[3].item()


def _lambda(sigma):
    alpha = 1 / math.sqrt(sigma * sigma + 1)
    return math.log(alpha) - math.log(sigma * alpha)


def _expected_third_step(algo, x_in, sigma_s, sigma_t, coefficients):
    a, b, c = coefficients
    alpha_s, alpha_t = 1 / math.sqrt(sigma_s**2 + 1), 1 / math.sqrt(sigma_t**2 + 1)
    lam_s, lam_t = _lambda(sigma_s), _lambda(sigma_t)
    h = lam_t - lam_s
    value, slope, half_curvature = a + b * lam_s + c * lam_s**2, b + 2 * c * lam_s, c / 2
    kernel = {
        "dpmsolver++": lambda u: np.exp(-(h - u)),
        "sde-dpmsolver++": lambda u: 2 * np.exp(-2 * (h - u)),
        "dpmsolver": lambda u: np.exp(-(lam_s + u)),
        "sde-dpmsolver": lambda u: 2 * np.exp(-(lam_s + u)),  # the reverse SDE doubles the score term
    }[algo]
    nodes, weights = np.polynomial.legendre.leggauss(30)
    u = 0.5 * h * (nodes + 1)
    moments = [0.5 * h * np.sum(weights * kernel(u) * u**k) for k in range(3)]
    integral = moments[0] * value + moments[1] * slope + moments[2] * half_curvature
    if algo.endswith("++"):
        linear = (sigma_t * alpha_t) / (sigma_s * alpha_s) * (math.exp(-h) if algo.startswith("sde") else 1.0)
        return linear * x_in + alpha_t * integral
    return alpha_t / alpha_s * x_in - alpha_t * integral


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"])
def test_third_order_step_integrates_the_fitted_quadratic(algo):
    config = {"algorithm_type": algo, "solver_order": 3}
    config.update({"prediction_type": "sample"} if algo.endswith("++") else {"final_sigmas_type": "sigma_min"})
    coefficients = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
                    for k in range(3)]
    x_in, x_out, sigma_s, sigma_t = _quadratic_third_step(DPMSolverMultistepScheduler(**config), coefficients)
    expected = _expected_third_step(algo, x_in, sigma_s, sigma_t, coefficients)
    assert_close(x_out, expected, f"{algo} third order")

    if algo in ("dpmsolver++", "dpmsolver"):  # the ODE steps: diffusers agrees, which pins the convention
        _, ref_out, _, _ = _quadratic_third_step(diffusers.DPMSolverMultistepScheduler(**config), coefficients)
        assert_close(ref_out, expected, f"diffusers {algo} third order")
    elif algo == "sde-dpmsolver++":  # diffusers' sign error on the 1/2 of the D2 weight
        _, ref_out, _, _ = _quadratic_third_step(diffusers.DPMSolverMultistepScheduler(**config), coefficients)
        assert (ref_out - expected).abs().max() > 1e-3
    else:  # diffusers has no third-order sde-dpmsolver update at all
        with pytest.raises(UnboundLocalError):
            _quadratic_third_step(diffusers.DPMSolverMultistepScheduler(**config), coefficients)


def test_zero_length_final_step_leaves_the_sample():
    # A Karras ladder ending on sigma_min repeats that sigma; the last step has h = 0. With order 3 and >= 15
    # steps diffusers divides by h and returns NaN; the exact solution of a zero-length step is the sample.
    config = {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3}
    ours, ref = assert_same_run("DPMSolverMultistepScheduler", config, 20, compare_steps=19)
    assert torch.equal(ours[-1], ours[-2])
    assert torch.isnan(reference_loop("DPMSolverMultistepScheduler", config, 20)[-1]).all()


def test_repeated_first_timestep_starts_at_the_first():
    # On the cosine schedule a Karras ladder's first two timesteps both truncate to 998. diffusers then starts a
    # run at the second (the rule for Heun's doubled timesteps) and indexes past its ladder; with
    # set_begin_index(0) it runs, and gives the run we give without it.
    config = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}
    ours = DPMSolverMultistepScheduler(**config)
    ref = diffusers.DPMSolverMultistepScheduler(**config)
    ours_samples = sample_loop(ours, config, 6)
    ref.set_timesteps(6)
    ref.set_begin_index(0)
    assert ref.timesteps[0] == ref.timesteps[1]
    assert torch.equal(ours.timesteps, ref.timesteps)
    ref_samples = sample_loop_prepared(ref, config, torch.float32)
    assert_close(ours_samples[-1], ref_samples[-1], "cosine karras")
    with pytest.raises(IndexError):
        reference_loop("DPMSolverMultistepScheduler", config, 6)


# -- UniPC -----------------------------------------------------------------------------------------------------

UNIPC_CONFIGS = [
    {},
    {"solver_order": 3},
    {"solver_order": 1},
    {"solver_order": 4, "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"prediction_type": "v_prediction", "solver_order": 3},
    {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5},
    {"disable_corrector": [0, 1]},
    {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
    {"use_flow_sigmas": True, "use_karras_sigmas": True, "prediction_type": "flow_prediction"},
    {"solver_type": "midpoint"},  # a DPM-Solver config: read as bh2
]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("config", UNIPC_CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_unipc_matches_diffusers(config, n):
    assert_same_run("UniPCMultistepScheduler", config, n)


def test_unipc_custom_sigmas_dynamic_shift_and_solver_p():
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    assert_same_run("UniPCMultistepScheduler", flow, None, set_kwargs={"sigmas": np.linspace(1.0, 0.05, 6)})
    assert_same_run("UniPCMultistepScheduler", {**flow, "use_dynamic_shifting": True}, 8, set_kwargs={"mu": 0.7})
    terminal = {**flow, "flow_shift": 2.0, "shift_terminal": 0.1}
    assert_same_run("UniPCMultistepScheduler", terminal, 8)
    with pytest.raises(ValueError, match="shift_terminal"):  # diffusers divides 0 by 0 here
        UniPCMultistepScheduler(**terminal).set_timesteps(1)
    ours = sample_loop(UniPCMultistepScheduler(solver_p=DPMSolverMultistepScheduler()), {}, 8)
    ref = sample_loop(diffusers.UniPCMultistepScheduler(solver_p=diffusers.DPMSolverMultistepScheduler()), {}, 8)
    assert_close(ours[-1], ref[-1], "solver_p")


# Stepping to sigma = 0, lambda_t = +inf, so h = inf and, for the data prediction, hh = -h = -inf.
#  * bh1 uses B(h) = hh = -inf. The last step is first order, its higher-order sum is the number 0, and
#    diffusers still forms alpha_t * B(h) * 0 = NaN, which poisons every element (bh2 has B = e^hh - 1 = -1).
#  * with lower_order_final=False the last step keeps order >= 2; its differences divide by
#    r_k = (lambda_k - lambda_s0) / h = 0, giving inf/NaN for bh1 and bh2 (and a singular solve at order 3).
#  * predicting noise (predict_x0=False), the first-order weight sigma_t (e^h - 1) is 0 * inf = NaN.
# The first-order step to sigma = 0 has a finite limit, the data prediction itself (DDIM's x0), and that is
# what we return; differences in lambda have no limit, so that step is first order whatever the settings.
UNIPC_TO_ZERO = [
    {"solver_type": "bh1"},
    {"solver_type": "bh1", "solver_order": 3},
    {"solver_type": "bh2", "lower_order_final": False},
    {"solver_type": "bh1", "solver_order": 3, "lower_order_final": False},
    {"predict_x0": False},
]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("config", UNIPC_TO_ZERO, ids=lambda c: json.dumps(c, sort_keys=True))
def test_unipc_last_step_to_sigma_zero_is_the_data_prediction(config, n):
    name = "UniPCMultistepScheduler"
    ours = sample_loop(OURS[name](**config), config, n)
    ref_scheduler = getattr(diffusers, name)(**config)
    try:
        ref = sample_loop(ref_scheduler, config, n)
    except torch.linalg.LinAlgError:  # order 3 into sigma = 0: diffusers' solve is singular
        ref = None
    if ref is not None:
        for i, (a, b) in enumerate(zip(ours[:-1], ref[:-1])):
            assert_close(a, b, f"{config} n={n} step {i}")
        # a single bh2 step on the data prediction is the one case diffusers gets through
        works = n == 1 and config.get("solver_type", "bh2") == "bh2" and config.get("predict_x0", True)
        assert bool(torch.isfinite(ref[-1]).all()) == works
        if works:
            assert_close(ours[-1], ref[-1], f"{config} n={n}")

    # The data prediction at the last step, from diffusers' state there (set before its predictor fails):
    # the converted output itself, or for a noise-predicting solver the x0 its eps implies at the corrected
    # sample. That x0 inherits eps's float32 rounding magnified sigma_s / alpha_s times (~160 at t = 999).
    m0, corrected = ref_scheduler.model_outputs[-1], ref_scheduler.last_sample
    assert torch.isfinite(ours[-1]).all()
    if config.get("predict_x0", True):
        assert_close(ours[-1], m0, f"{config} n={n} last step")
    else:
        alpha_s, sigma_s = ref_scheduler._sigma_to_alpha_sigma_t(ref_scheduler.sigmas[-2])
        expected = (corrected - sigma_s * m0) / alpha_s
        error = (ours[-1] - expected).abs().max().item()
        assert error <= 1e-5 * max(1.0, (sigma_s / alpha_s).item()), f"{config} n={n} last step: {error:.3g}"


# -- DEIS ------------------------------------------------------------------------------------------------------

DEIS_CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False},
    {"use_karras_sigmas": True},
    {"solver_order": 3, "use_karras_sigmas": True},
    {"prediction_type": "v_prediction"},
    {"solver_order": 3, "prediction_type": "v_prediction"},
    {"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.3},
    {"timestep_spacing": "trailing"},
    {"solver_order": 3, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"algorithm_type": "dpmsolver++", "solver_type": "bh2"},  # a DPM-Solver/UniPC config
]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("config", DEIS_CONFIGS, ids=lambda c: json.dumps(c, sort_keys=True))
def test_deis_matches_diffusers(config, n):
    name = "DEISMultistepScheduler"
    if config.get("solver_order") == 3 and n >= 5:
        # Third-order steps. diffusers evaluates their weights (a closed form in log rho) in float32, where the
        # difference of two large antiderivatives cancels: its float32 run is ~1e-4 off its own algorithm in
        # float64. Ours integrates the same Lagrange polynomial in float64; compare with diffusers in float64.
        ours_scheduler = OURS[name](**config)
        ours = sample_loop(ours_scheduler, config, n)
        ref = float64_reference_loop(name, config, n)
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_close(a, b, f"{config} n={n} step {i}")
        return
    assert_same_run(name, config, n)


# -- config, interface, bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(OURS))
def test_config_keys_defaults_and_compatibles_match(name, tmp_path):
    ours_cls, ref_cls = OURS[name], getattr(diffusers, name)

    def defaults(cls):
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items() if k != "self" and p.kind != p.VAR_KEYWORD}

    assert defaults(ours_cls) == defaults(ref_cls)
    assert set(ours_cls._compatibles) == set(ref_cls._compatibles)
    assert all(isinstance(c, str) for c in ours_cls._compatibles)

    # round trip: ours -> disk -> diffusers, and diffusers -> disk -> ours
    ours = ours_cls(solver_order=3, beta_schedule="scaled_linear", timestep_spacing="trailing")
    ours.save_pretrained(tmp_path / "ours")
    loaded = ref_cls.from_pretrained(tmp_path / "ours")
    ref = ref_cls(solver_order=1, use_karras_sigmas=True, steps_offset=1)
    ref.save_pretrained(tmp_path / "ref")
    back = ours_cls.from_pretrained(tmp_path / "ref")
    for key in defaults(ours_cls):
        assert loaded.config[key] == ours.config[key], key
        assert back.config[key] == ref.config[key], key


def test_configs_cross_between_the_families():
    deis = DEISMultistepScheduler(solver_order=3)
    dpm = DPMSolverMultistepScheduler.from_config(deis.config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 3
    unipc = UniPCMultistepScheduler.from_config(DPMSolverMultistepScheduler(solver_type="heun").config)
    assert unipc.config.solver_type == "bh2"
    assert DEISMultistepScheduler.from_config(unipc.config).config.solver_type == "logrho"


@pytest.mark.parametrize("name", list(OURS))
def test_public_interface(name):
    scheduler = OURS[name]()
    assert len(scheduler) == 1000 and scheduler.init_noise_sigma == 1.0 and scheduler.order == 1
    scheduler.set_timesteps(10)
    assert scheduler.step_index is None and scheduler.begin_index is None
    x = torch.randn(SHAPE)
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x
    scheduler.set_begin_index(3)
    t = scheduler.timesteps[3]
    out = scheduler.step(fake_model("epsilon")(x, t), t, x)
    assert scheduler.step_index == 4 and out.prev_sample.shape == SHAPE


@pytest.mark.parametrize("name", list(OURS))
def test_add_noise_matches_diffusers(name):
    ours, ref = OURS[name](), getattr(diffusers, name)()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(10)
    timesteps = ours.timesteps[[2, 7]]
    assert_close(ours.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps), "by timestep")
    for scheduler in (ours, ref):
        scheduler.set_begin_index(4)  # img2img
    assert_close(ours.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps), "from begin index")


@pytest.mark.parametrize("name", list(OURS))
def test_add_noise_before_set_timesteps_uses_training_timesteps(name):
    # Before set_timesteps the schedule is every training step, listed 999..0, while the sigma ladder runs
    # 0..999, and diffusers pairs timestep t with the sigma of 999 - t. The forward process at t is
    # sqrt(a_t) x0 + sqrt(1 - a_t) eps.
    scheduler = OURS[name]()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    timesteps = torch.tensor([10, 900])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    assert_close(scheduler.add_noise(x0, noise, timesteps), expected, "training add_noise")


@pytest.mark.parametrize("name", list(OURS))
def test_runs_never_share_state(name):
    config = {"algorithm_type": "sde-dpmsolver++"} if name == "DPMSolverMultistepScheduler" else {}
    model = fake_model("epsilon")
    scheduler = OURS[name](**config)
    scheduler.set_timesteps(6)
    outputs_before = scheduler.model_outputs
    first, second = scheduler.for_call(), scheduler.for_call()
    x = y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    gx, gy = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    kwargs = (lambda g: {"generator": g}) if config else (lambda g: {})
    for t in first.timesteps:  # two copies stepped in turn behave like two separate runs
        x = first.step(model(x, t), t, x, **kwargs(gx)).prev_sample
        y = second.step(model(y, t), t, y, **kwargs(gy)).prev_sample
    assert torch.equal(x, y)
    assert scheduler.step_index is None and scheduler.model_outputs is outputs_before
    assert all(m is None for m in outputs_before)
    # set_timesteps starts over with fresh per-run state
    first.set_timesteps(6)
    assert first.step_index is None and first.lower_order_nums == 0 and all(m is None for m in first.model_outputs)
    fresh = sample_loop(first, {}, 6, noise_seed=5 if config else None)
    again = sample_loop(OURS[name](**config), {}, 6, noise_seed=5 if config else None)
    assert torch.equal(fresh[-1], again[-1])


@pytest.mark.parametrize("make, match", [
    (lambda: DPMSolverMultistepScheduler(algorithm_type="dpm"), "dpmsolver\\+\\+"),
    (lambda: DPMSolverMultistepScheduler(solver_type="rk4"), "midpoint"),
    (lambda: DPMSolverMultistepScheduler(solver_order=4), "orders 1, 2 and 3"),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver"), "sigma_min"),
    (lambda: DPMSolverMultistepScheduler(final_sigmas_type="one"), "'zero' or 'sigma_min'"),
    (lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                         prediction_type="flow_prediction"), "data-prediction"),
    (lambda: DPMSolverMultistepScheduler(prediction_type="score"), "prediction_type"),
    (lambda: DPMSolverMultistepScheduler(use_karras_sigmas=True, use_beta_sigmas=True), "only one"),
    (lambda: DPMSolverMultistepScheduler(beta_schedule="cubic"), "beta_schedule"),
    (lambda: UniPCMultistepScheduler(solver_type="bh3"), "bh1"),
    (lambda: UniPCMultistepScheduler(solver_order=0), "solver_order"),
    (lambda: UniPCMultistepScheduler(shift_terminal=0.1), "use_flow_sigmas"),
    (lambda: DEISMultistepScheduler(solver_order=4), "orders 1, 2 and 3"),
    (lambda: DEISMultistepScheduler(algorithm_type="sde-dpmsolver++"), "deis"),
    (lambda: DEISMultistepScheduler(solver_type="bh3"), "logrho"),
])
def test_bad_config(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_set_timesteps_and_step():
    dpm = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        dpm.set_timesteps(5, timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="descending"):
        dpm.set_timesteps(timesteps=[100, 500, 900])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        dpm.set_timesteps(5, mu=0.5)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DPMSolverMultistepScheduler(timestep_spacing="uniform").set_timesteps(5)
    with pytest.raises(ValueError, match="positive integer"):
        dpm.set_timesteps(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        dpm.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    dpm.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of this scheduler's timesteps"):
        dpm.step(torch.zeros(SHAPE), 998, torch.zeros(SHAPE))

    unipc = UniPCMultistepScheduler()
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        unipc.set_timesteps(sigmas=[0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="mu"):
        UniPCMultistepScheduler(use_dynamic_shifting=True).set_timesteps(5)
    flow = UniPCMultistepScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="descending"):
        flow.set_timesteps(sigmas=[0.1, 0.5])
    with pytest.raises(ValueError, match="disagrees"):
        flow.set_timesteps(4, sigmas=[0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="set_timesteps"):
        unipc.step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        DEISMultistepScheduler().set_timesteps(5, mu=0.5)
