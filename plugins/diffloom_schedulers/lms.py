"""Linear multistep (Adams-Bashforth in sigma) sampling, k-diffusion's ``sample_lms``.

The derivatives seen at the last few sigmas are fitted by a polynomial in sigma; integrating that polynomial
over the next interval gives the update. The weight of each past derivative is the integral of its Lagrange
basis polynomial.

diffusers integrates that basis with SciPy's ``quad`` (QUADPACK) on a float32 integrand: the quadrature point
is rounded to float32 before the differences tau - sigma_k are taken, which costs up to ~1e-4 of relative
accuracy where sigmas crowd together (Karras or beta ladders, many steps). The weights here repeat that
computation, 21-point Gauss-Kronrod on the float32 integrand, so the samples agree with diffusers to float32
rounding instead of to that quadrature noise. Where QUADPACK would not accept the first Gauss-Kronrod pass
(a few percent of weights at most, where float32 noise swamps the integrand), the exact integral is used instead.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule

# The 21-point Gauss-Kronrod rule (QUADPACK's qk21): abscissae on [0, 1] of the symmetric rule, the last one the
# centre; every second abscissa from the second on is also a node of the embedded 10-point Gauss rule.
GK21_NODES = np.array([
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452, 0.930157491355708226001207180059508,
    0.865063366688984510732096688423493, 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784, 0.294392862701460198131126603103866,
    0.148874338981631210884826001129720, 0.0])
GK21_WEIGHTS = np.array([
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
    0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077958109831074, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
    0.147739104901338491374841515972068, 0.149445554002916905664936468389821])
GAUSS10_WEIGHTS = np.array([
    0.066671344308688137593568809893332, 0.149451349150580593145776339657697, 0.219086362515982043995534934228163,
    0.269266719309996355091226921569469, 0.295524224714752870173892994651338])
EPSILON = np.finfo(np.float64).eps


def lagrange_basis_float32(tau: np.ndarray, nodes: np.ndarray, j: int) -> np.ndarray:
    """The Lagrange basis polynomial that is 1 at nodes[j] (float32 values), evaluated in float32 at tau
    (rounded to float32 first), factor by factor."""
    tau = tau.astype(np.float32)
    value = np.ones_like(tau)
    for k, node in enumerate(nodes):
        if k != j:
            value = value * ((tau - node) / (nodes[j] - node))
    return value


def exact_lagrange_integral(nodes: np.ndarray, j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis on ``nodes`` in float64 (Gauss-Legendre, exact for it)."""
    x, w = np.polynomial.legendre.leggauss(max(len(nodes), 1))
    tau = (b - a) / 2 * x + (a + b) / 2
    value = np.ones_like(tau)
    for k, node in enumerate(nodes.astype(np.float64)):
        if k != j:
            value = value * ((tau - node) / (float(nodes[j]) - node))
    return float((b - a) / 2 * np.dot(w, value))


def lms_weight(nodes: np.ndarray, j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the float32 Lagrange basis on ``nodes`` (float32 sigmas), as QUADPACK's first
    Gauss-Kronrod pass computes it (scipy.integrate.quad with epsrel=1e-4, the default epsabs); the exact
    integral where QUADPACK would go on to subdivide."""
    if a == b:
        return 0.0  # a repeated sigma: QUADPACK returns 0 without evaluating the (here undefined) basis
    with np.errstate(divide="ignore", invalid="ignore"):  # repeated nodes give inf / NaN, as in the reference
        return _first_gauss_kronrod_pass(nodes, j, a, b)


def _first_gauss_kronrod_pass(nodes: np.ndarray, j: int, a: float, b: float) -> float:
    centre, half = 0.5 * (a + b), 0.5 * (b - a)
    # float32 integrand values, summed in float64
    f_centre = float(lagrange_basis_float32(np.array([centre]), nodes, j)[0])
    f_left = lagrange_basis_float32(centre - half * GK21_NODES[:-1], nodes, j).astype(np.float64)
    f_right = lagrange_basis_float32(centre + half * GK21_NODES[:-1], nodes, j).astype(np.float64)
    pairs = f_left + f_right
    # QUADPACK sums the centre, then the Gauss nodes, then the Kronrod-only nodes
    kronrod = GK21_WEIGHTS[-1] * f_centre
    for i in (*range(1, 10, 2), *range(0, 10, 2)):
        kronrod += GK21_WEIGHTS[i] * pairs[i]
    gauss = float(np.dot(GAUSS10_WEIGHTS, pairs[1:10:2]))
    result = kronrod * half

    # QUADPACK's error estimate and its test for stopping after this first pass
    mean = kronrod * 0.5
    spread = GK21_WEIGHTS[-1] * abs(f_centre - mean) + float(np.dot(
        GK21_WEIGHTS[:-1], np.abs(f_left - mean) + np.abs(f_right - mean)))
    magnitude = (GK21_WEIGHTS[-1] * abs(f_centre) + float(np.dot(
        GK21_WEIGHTS[:-1], np.abs(f_left) + np.abs(f_right)))) * abs(half)
    spread *= abs(half)
    error = abs((kronrod - gauss) * half)
    if spread != 0 and error != 0:
        error = spread * min(1.0, (200 * error / spread) ** 1.5)
    if magnitude > np.finfo(np.float64).tiny / (50 * EPSILON):
        error = max(50 * EPSILON * magnitude, error)
    bound = max(1.49e-8, 1e-4 * abs(result))
    accepted = (error <= bound and error != magnitude) or error == 0 or error <= 100 * EPSILON * magnitude
    if accepted:
        return float(result)
    return exact_lagrange_integral(nodes, j, a, b)


class LMSDiscreteScheduler(SchedulerMixin, schedule.SigmaLadderMixin):
    _compatibles = schedule.KARRAS_COMPATIBLES
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        schedule.check_one_sigma_option(self.config)
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        schedule.check_schedule_args(type(self).__name__, num_inference_steps, timesteps, sigmas)
        config = self.config
        self.num_inference_steps = num_inference_steps
        grid = schedule.spaced_timesteps(config.timestep_spacing, num_inference_steps, config.num_train_timesteps,
                                         config.steps_offset, integer=False)
        train_sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = np.interp(grid, np.arange(len(train_sigmas)), train_sigmas)
        # Karras spacing always spans the interpolated ends; the other two honour sigma_min / sigma_max that a
        # config converted from Euler may carry
        use_bounds = not config.use_karras_sigmas
        respaced = schedule.respace_sigmas(sigmas, np.log(train_sigmas), num_inference_steps, config,
                                           config.get("sigma_min") if use_bounds else None,
                                           config.get("sigma_max") if use_bounds else None)
        if respaced is not None:
            sigmas, grid = respaced
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(grid).to(device=device, dtype=torch.float32)
        self.derivatives = []
        self._step_index = None
        self._begin_index = None

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Weight of the derivative taken ``current_order`` steps ago, for the step from sigma_t to sigma_{t+1}."""
        nodes = np.array([self.sigmas[t - k].item() for k in range(order)], dtype=np.float32)
        return lms_weight(nodes, current_order, self.sigmas[t].item(), self.sigmas[t + 1].item())

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        if not self.is_scale_input_called:
            warnings.warn("call scale_model_input before step, or the denoiser sees unscaled inputs", stacklevel=2)
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        sigma = self.sigmas[self._step_index]
        x0 = schedule.sigma_predict_x0(self.config.prediction_type, model_output, sample, sigma,
                                       type(self).__name__)
        self.derivatives = [*self.derivatives, (sample - x0) / sigma][-order:]

        order = min(self._step_index + 1, order)  # fewer past points at the start
        coefficients = [self.get_lms_coefficient(order, self._step_index, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coefficients, reversed(self.derivatives)))
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
