"""DDPM, DDIM, PNDM, LCM, Euler, Euler ancestral, Heun and LMS against diffusers, number for number.

A fixed smooth function of (sample, t) stands in for the denoiser, so a full sampling loop is cheap and fully
deterministic; stochastic schedulers get identically seeded generators.
"""

import inspect
import logging
import warnings

import diffusers
import numpy as np
import pytest
import scipy.stats
import torch

from diffloom_schedulers import schedule
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
STOCHASTIC = {DDPMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler}
SHAPE = (2, 4, 8, 8)

# (class, config, step kwargs): several configs per class, covering its options
CASES = [
    (DDPMScheduler, {}, {}),
    (DDPMScheduler, dict(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
                         timestep_spacing="trailing"), {}),
    (DDPMScheduler, dict(thresholding=True, sample_max_value=2.0, variance_type="fixed_large",
                         timestep_spacing="linspace"), {}),
    (DDPMScheduler, dict(prediction_type="sample", variance_type="fixed_small_log", beta_schedule="sigmoid",
                         steps_offset=1, rescale_betas_zero_snr=True), {}),
    (DDPMScheduler, dict(beta_schedule="laplace", clip_sample=False), {}),
    (DDIMScheduler, {}, {}),
    (DDIMScheduler, dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                         clip_sample=False), {}),
    (DDIMScheduler, dict(prediction_type="sample", beta_schedule="scaled_linear", set_alpha_to_one=False,
                         timestep_spacing="linspace", thresholding=True), {}),
    (DDIMScheduler, dict(steps_offset=1, clip_sample_range=0.5), dict(eta=1.0, use_clipped_model_output=True)),
    (PNDMScheduler, dict(skip_prk_steps=True), {}),
    (PNDMScheduler, dict(skip_prk_steps=True, prediction_type="v_prediction", timestep_spacing="trailing",
                         set_alpha_to_one=True), {}),
    (PNDMScheduler, dict(timestep_spacing="linspace", beta_schedule="scaled_linear"), {}),
    (PNDMScheduler, dict(steps_offset=1, beta_schedule="squaredcos_cap_v2"), {}),
    (LCMScheduler, {}, {}),
    (LCMScheduler, dict(prediction_type="v_prediction", original_inference_steps=100, timestep_scaling=5.0), {}),
    (LCMScheduler, dict(clip_sample=True, beta_schedule="linear", set_alpha_to_one=False), {}),
    (LCMScheduler, dict(prediction_type="sample", thresholding=True, rescale_betas_zero_snr=True), {}),
    (EulerDiscreteScheduler, {}, {}),
    (EulerDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction"), {}),
    (EulerDiscreteScheduler, dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1,
                                  sigma_min=0.05), {}),
    (EulerDiscreteScheduler, dict(use_beta_sigmas=True, timestep_spacing="trailing",
                                  final_sigmas_type="sigma_min", prediction_type="sample"), {}),
    (EulerDiscreteScheduler, dict(timestep_type="continuous", prediction_type="v_prediction",
                                  rescale_betas_zero_snr=True, use_karras_sigmas=True, sigma_max=80.0), {}),
    (EulerDiscreteScheduler, dict(interpolation_type="log_linear", beta_schedule="scaled_linear"), {}),
    (EulerDiscreteScheduler, {}, dict(s_churn=1.0, s_tmin=0.5, s_tmax=50.0, s_noise=1.003)),
    (EulerAncestralDiscreteScheduler, {}, {}),
    (EulerAncestralDiscreteScheduler, dict(prediction_type="v_prediction", timestep_spacing="trailing",
                                           rescale_betas_zero_snr=True), {}),
    (EulerAncestralDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1,
                                           beta_schedule="scaled_linear"), {}),
    (HeunDiscreteScheduler, {}, {}),
    (HeunDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction"), {}),
    (HeunDiscreteScheduler, dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1,
                                 clip_sample=True, clip_sample_range=2.0), {}),
    (HeunDiscreteScheduler, dict(use_beta_sigmas=True, prediction_type="sample", timestep_spacing="trailing"), {}),
    (HeunDiscreteScheduler, dict(beta_schedule="exp"), {}),
    (LMSDiscreteScheduler, {}, {}),
    (LMSDiscreteScheduler, dict(use_karras_sigmas=True, prediction_type="v_prediction"), {}),
    (LMSDiscreteScheduler, dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1), {}),
    (LMSDiscreteScheduler, dict(use_beta_sigmas=True, beta_schedule="scaled_linear", timestep_spacing="trailing"),
     {}),
    (LMSDiscreteScheduler, dict(prediction_type="sample", beta_schedule="squaredcos_cap_v2"), dict(order=3)),
]


def fake_model(x, t):
    """A smooth, deterministic stand-in for a denoiser."""
    return torch.sin(0.7 * x + float(t) / 300.0) * 0.8 + 0.1 * x


def reference(cls):
    return getattr(diffusers, cls.__name__)


def sample_loop(scheduler, set_kwargs, step_kwargs, seed=None):
    scheduler.set_timesteps(**set_kwargs)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    step_kwargs = dict(step_kwargs)
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def tolerance(scheduler):
    # diffusers integrates the LMS weights with the integrand evaluated in float32 (~1e-7 relative); ours are
    # exact, so the two differ by float32 rounding of the largest sigma
    if isinstance(scheduler, LMSDiscreteScheduler):
        return 1e-5 + 1e-6 * float(scheduler.sigmas.max())
    return 1e-5


def case_id(case):
    cls, config, step_kwargs = case
    parts = [f"{k}={v}" for k, v in {**config, **step_kwargs}.items()]
    return cls.__name__.replace("Scheduler", "") + ("[" + ",".join(parts) + "]" if parts else "")


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def runs_with(case, steps):
    cls, config, _ = case
    # PNDM's Runge-Kutta warm-up spans four steps; fewer is an error in both libraries (tested below)
    return not (cls is PNDMScheduler and not config.get("skip_prk_steps") and steps < 4)


LOOPS = [pytest.param(case, steps, id=f"{case_id(case)}-{steps}")
         for case in CASES for steps in (1, 4, 25) if runs_with(case, steps)]


@pytest.mark.parametrize("case,steps", LOOPS)
def test_full_loop_matches_diffusers(case, steps):
    cls, config, step_kwargs = case
    ours, ref = cls(**config), reference(cls)(**config)
    stochastic = cls in STOCHASTIC or step_kwargs.get("eta") or step_kwargs.get("s_churn")
    seed = 7 if stochastic else None
    x_ours = sample_loop(ours, dict(num_inference_steps=steps), step_kwargs, seed)
    x_ref = sample_loop(ref, dict(num_inference_steps=steps), step_kwargs, seed)

    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas"):
        assert torch.equal(ours.sigmas, ref.sigmas)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    assert torch.isfinite(x_ours).all()
    assert (x_ours - x_ref).abs().max().item() <= tolerance(ours)


def test_pndm_with_runge_kutta_steps_needs_four_steps():
    with pytest.raises(ValueError, match="skip_prk_steps"):
        PNDMScheduler().set_timesteps(3)


@pytest.mark.parametrize("cls,set_kwargs", [
    (DDPMScheduler, dict(timesteps=[999, 800, 555, 300, 120, 0])),
    (LCMScheduler, dict(timesteps=[999, 759, 499, 259])),
    (LCMScheduler, dict(timesteps=[899, 639, 379, 119, 39], strength=0.6)),
    (HeunDiscreteScheduler, dict(timesteps=[999.0, 720.5, 410.0, 90.0])),
    (EulerDiscreteScheduler, dict(timesteps=[999, 700, 420, 100, 3])),
    (EulerDiscreteScheduler, dict(sigmas=[14.6, 6.0, 2.5, 0.7, 0.1, 0.0])),
    (LCMScheduler, dict(num_inference_steps=4, original_inference_steps=20, strength=0.5)),
], ids=lambda v: v.__name__ if isinstance(v, type) else "-".join(f"{k}" for k in v))
def test_custom_schedules_match_diffusers(cls, set_kwargs):
    config = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours, ref = cls(**config), reference(cls)(**config)
    seed = 3 if cls in STOCHASTIC else None
    x_ours, x_ref = sample_loop(ours, set_kwargs, {}, seed), sample_loop(ref, set_kwargs, {}, seed)
    assert torch.equal(ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas"):
        assert torch.equal(ours.sigmas, ref.sigmas)
    assert (x_ours - x_ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "fixed_large", "learned", "learned_range"])
def test_ddpm_variance_types_match_diffusers(variance_type):
    ours, ref = DDPMScheduler(variance_type=variance_type), diffusers.DDPMScheduler(variance_type=variance_type)
    results = []
    for scheduler in (ours, ref):
        scheduler.set_timesteps(10)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:
            eps = fake_model(x, t)
            # learned types: the second half of the channels is the variance (learned) or the interpolation
            # weight in [-1, 1] between the two fixed log variances (learned_range)
            extra = torch.tanh(x) if variance_type == "learned_range" else 0.02 * torch.sigmoid(x)
            out = torch.cat([eps, extra], dim=1)
            x = scheduler.step(out if variance_type.startswith("learned") else eps, t, x, generator=g).prev_sample
        results.append(x)
    assert torch.isfinite(results[0]).all()
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)


def test_generator_lists_draw_per_batch_item():
    results = []
    for cls in (EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler):
        scheduler = cls()
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        results.append(sample_loop(scheduler, dict(num_inference_steps=5), dict(generator=gens)))
    assert torch.equal(results[0], results[1])


def test_ddim_takes_given_variance_noise_and_refuses_it_with_a_generator():
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outs = []
    for cls in (DDIMScheduler, diffusers.DDIMScheduler):
        s = cls()
        s.set_timesteps(10)
        t = s.timesteps[3]
        outs.append(s.step(fake_model(x, t), t, x, eta=0.5, variance_noise=noise))
    assert torch.equal(outs[0].prev_sample, outs[1].prev_sample)
    assert torch.equal(outs[0].pred_original_sample, outs[1].pred_original_sample)
    with pytest.raises(ValueError, match="generator"):
        s = DDIMScheduler()
        s.set_timesteps(10)
        s.step(x, s.timesteps[0], x, eta=0.5, variance_noise=noise, generator=torch.Generator())


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_add_noise_and_scale_model_input_match_diffusers(cls):
    ours, ref = cls(), reference(cls)()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for scheduler in (ours, ref):
        scheduler.set_timesteps(10)
    picks = torch.tensor([2, 5])
    t_ours, t_ref = ours.timesteps[picks], ref.timesteps[picks]
    assert torch.equal(ours.add_noise(x0, noise, t_ours), ref.add_noise(x0, noise, t_ref))
    t = ours.timesteps[4]
    assert torch.equal(ours.scale_model_input(x0, t), ref.scale_model_input(x0, ref.timesteps[4]))
    if hasattr(ref, "set_begin_index"):  # img2img: the pipeline fixes where sampling begins
        ours_b, ref_b = cls(), reference(cls)()
        for scheduler in (ours_b, ref_b):
            scheduler.set_timesteps(10)
            scheduler.set_begin_index(3)
        assert ours_b.begin_index == 3 and ours_b.step_index is None
        assert torch.equal(ours_b.add_noise(x0, noise, ours_b.timesteps[3:4].repeat(2)),
                           ref_b.add_noise(x0, noise, ref_b.timesteps[3:4].repeat(2)))
        if hasattr(ref_b, "sigmas"):
            ours_b.scale_model_input(x0, ours_b.timesteps[3])
            assert ours_b.step_index == 3


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler, LCMScheduler, EulerDiscreteScheduler],
                         ids=lambda c: c.__name__)
def test_get_velocity_matches_diffusers(cls):
    ours, ref = cls(), reference(cls)()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours.get_velocity(x0, noise, ours.timesteps[[1, 6]]),
                       ref.get_velocity(x0, noise, ref.timesteps[[1, 6]]))


def test_lms_coefficients_match_scipy_quadrature():
    for config in ({}, dict(use_karras_sigmas=True), dict(beta_schedule="scaled_linear")):
        ours, ref = LMSDiscreteScheduler(**config), diffusers.LMSDiscreteScheduler(**config)
        ours.set_timesteps(25)
        ref.set_timesteps(25)
        for t in range(25):
            order = min(t + 1, 4)
            for j in range(order):
                a, b = ours.get_lms_coefficient(order, t, j), ref.get_lms_coefficient(order, t, j)
                # scipy's integrand runs in float32, ours in float64: they agree to float32 resolution
                assert abs(a - b) <= 5e-7 * max(1.0, abs(b))


def test_beta_ppf_matches_scipy():
    qs = np.linspace(0, 1, 41)
    for a, b in ((0.6, 0.6), (2.0, 5.0), (0.5, 3.0)):
        ours = np.array([schedule.beta_ppf(q, a, b) for q in qs])
        assert np.abs(ours - scipy.stats.beta.ppf(qs, a, b)).max() < 1e-12


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_step_returns_an_output_or_a_tuple_like_diffusers(cls):
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for klass in (cls, reference(cls)):
        s = klass(skip_prk_steps=True) if cls is PNDMScheduler else klass()
        s.set_timesteps(4)
        t = s.timesteps[0]
        kwargs = dict(generator=torch.Generator().manual_seed(0)) if cls in STOCHASTIC else {}
        out = s.step(fake_model(x, t), t, s.scale_model_input(x, t), return_dict=False, **kwargs)
        results.append(out)
    assert isinstance(results[0], tuple) and len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lcm_output_names_the_denoised_sample():
    s = LCMScheduler()
    s.set_timesteps(2)
    x = torch.zeros(SHAPE)
    out = s.step(x, s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.denoised is out.pred_original_sample and out.prev_sample.shape == SHAPE
    assert len(out.to_tuple()) == 2


def test_heun_alternates_first_and_second_order_steps():
    s = HeunDiscreteScheduler()
    s.set_timesteps(3)
    assert len(s.timesteps) == 5 and s.state_in_first_order
    x = torch.zeros(SHAPE)
    s.step(x, s.timesteps[0], x)
    assert not s.state_in_first_order
    s.step(x, s.timesteps[1], x)
    assert s.state_in_first_order


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_init_signature_compatibles_and_order_match_diffusers(cls):
    def init_params(klass):
        return [(n, p.default) for n, p in inspect.signature(klass.__init__).parameters.items() if n != "self"]

    ref = reference(cls)
    assert init_params(cls) == init_params(ref)
    assert list(cls._compatibles) == list(ref._compatibles)
    assert cls.order == ref.order
    assert len(cls()) == len(ref()) == 1000


# -- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_unknown_beta_schedule_names_value_and_choices(cls):
    with pytest.raises(ValueError, match=r"beta_schedule='cubic'.*linear.*scaled_linear"):
        cls(beta_schedule="cubic")


@pytest.mark.parametrize("cls", [c for c in OURS if c is not LCMScheduler], ids=lambda c: c.__name__)
def test_unknown_timestep_spacing(cls):  # LCM takes its grid from original_inference_steps, not the spacing
    if cls in (HeunDiscreteScheduler, LMSDiscreteScheduler):  # they build a schedule in __init__
        with pytest.raises(ValueError, match="timestep_spacing='sideways'.*leading"):
            cls(timestep_spacing="sideways")
        return
    s = cls(timestep_spacing="sideways")
    with pytest.raises(ValueError, match="timestep_spacing='sideways'.*leading"):
        s.set_timesteps(10)


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_more_steps_than_training_timesteps(cls):
    with pytest.raises(ValueError, match="num_inference_steps=1001.*num_train_timesteps=1000"):
        cls().set_timesteps(1001)


@pytest.mark.parametrize("cls", [DDPMScheduler, LCMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler],
                         ids=lambda c: c.__name__)
def test_custom_timesteps_must_descend(cls):
    with pytest.raises(ValueError, match=r"strictly descending.*timesteps\[2\]"):
        cls().set_timesteps(timesteps=[900, 500, 700, 100])
    with pytest.raises(ValueError, match="strictly descending"):
        cls().set_timesteps(timesteps=[900, 500, 500])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        cls().set_timesteps(timesteps=[1000, 500])


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_timesteps_and_sigmas_together(cls):
    with pytest.raises(ValueError, match="both timesteps= and sigmas="):
        cls().set_timesteps(timesteps=[900, 100], sigmas=[3.0, 1.0, 0.0])


@pytest.mark.parametrize("cls", [DDIMScheduler, PNDMScheduler, EulerAncestralDiscreteScheduler,
                                 LMSDiscreteScheduler], ids=lambda c: c.__name__)
def test_custom_schedules_refused_where_the_algorithm_has_none(cls):
    with pytest.raises(ValueError, match="does not take custom timesteps"):
        cls().set_timesteps(timesteps=[900, 100])
    with pytest.raises(ValueError, match="does not take custom sigmas"):
        cls().set_timesteps(sigmas=[3.0, 1.0, 0.0])


def test_sigma_options_are_exclusive_and_conflict_with_custom_timesteps():
    with pytest.raises(ValueError, match="only one of"):
        EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        EulerDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900, 100])
    with pytest.raises(ValueError, match="descending"):
        EulerDiscreteScheduler().set_timesteps(sigmas=[1.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        EulerDiscreteScheduler().set_timesteps(4, sigmas=[3.0, 1.0, 0.0])


def test_integer_timesteps_are_refused_by_sigma_schedulers():
    s = EulerDiscreteScheduler()
    s.set_timesteps(4)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="integer timestep"):
        s.step(x, 3, x)


# -- per-call state --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_a_call_copy_leaves_the_shared_scheduler_untouched(cls):
    shared = cls(skip_prk_steps=True) if cls is PNDMScheduler else cls()
    shared.set_timesteps(6)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(shared).items()
              if isinstance(v, (torch.Tensor, int, float, type(None)))}
    seed = 1 if cls in STOCHASTIC else None
    first = sample_loop(shared.for_call(), dict(num_inference_steps=5), {}, seed)
    second = sample_loop(shared.for_call(), dict(num_inference_steps=5), {}, seed)
    assert torch.equal(first, second)  # the second call starts from clean state
    for key, value in before.items():
        now = getattr(shared, key)
        assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, key


def test_set_timesteps_rebinds_history_instead_of_clearing_it():
    for cls, attr in ((LMSDiscreteScheduler, "derivatives"), (PNDMScheduler, "ets")):
        s = cls()
        s.set_timesteps(5)
        old = getattr(s, attr)
        s.set_timesteps(5)
        assert getattr(s, attr) is not old


def test_ddpm_takes_variance_type_none_as_diffusers_does():
    # Other schedulers' configs carry variance_type=None; diffusers' DDPM then samples as fixed_small.
    config = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  variance_type=None)
    ours, ref = DDPMScheduler(**config), diffusers.DDPMScheduler(**config)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    sample, output = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 8, 8)
    for t in ref.timesteps[:3]:
        a = ours.step(output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        b = ref.step(output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(a, b)
    assert ours.config.variance_type is None
