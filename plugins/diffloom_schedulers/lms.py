"""Linear multistep (Adams-Bashforth in sigma) sampling, k-diffusion's ``sample_lms``.

The derivatives seen at the last few sigmas are fitted by a polynomial in sigma; integrating that polynomial
over the next interval gives the update. The weight of each past derivative is the integral of its Lagrange
basis polynomial, computed here by Gauss-Legendre quadrature, which is exact for polynomials of degree
< 2 * nodes.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule


def lagrange_integral(nodes: list[float], j: int, a: float, b: float) -> float:
    """Integral over [a, b] of the Lagrange basis polynomial that is 1 at nodes[j] and 0 at the other nodes."""
    x, w = np.polynomial.legendre.leggauss(max(len(nodes), 1))
    tau = (b - a) / 2 * x + (a + b) / 2  # map [-1, 1] onto [a, b]
    basis = np.ones_like(tau)
    for k, node in enumerate(nodes):
        if k != j:
            basis *= (tau - node) / (nodes[j] - node)
    return float((b - a) / 2 * np.dot(w, basis))


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
        nodes = [float(self.sigmas[t - k]) for k in range(order)]
        return lagrange_integral(nodes, current_order, float(self.sigmas[t]), float(self.sigmas[t + 1]))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True):
        if not self.is_scale_input_called:
            warnings.warn("call scale_model_input before step, or the denoiser sees unscaled inputs", stacklevel=2)
        if self._step_index is None:
            self._init_step_index(timestep)
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
