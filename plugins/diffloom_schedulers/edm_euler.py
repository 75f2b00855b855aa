"""Euler sampling for EDM-parameterised models (Karras et al. 2022, "Elucidating the Design Space...").

The network is preconditioned as in the paper's table 1: it sees c_in x with c_in = 1 / sqrt(sigma^2 +
sigma_data^2) and the time c_noise = log(sigma) / 4 (these are the timesteps), and the denoised sample is
D(x) = c_skip x + c_out F(x). The ladder runs from sigma_max to sigma_min along Karras' rho-spacing (or evenly in
log sigma), and each step is Euler's method on dx/dsigma = (x - D(x)) / sigma, optionally with churn.
"""

from __future__ import annotations

import logging
import math

import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule

logger = logging.getLogger(__name__)


def _ladder_dtype() -> torch.dtype:
    # float64 ladders, except where MPS is present (it has no float64): the reference does the same
    return torch.float32 if torch.backends.mps.is_available() else torch.float64


class EDMEulerScheduler(SchedulerMixin, schedule.SigmaLadderMixin):
    _compatibles = ()
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: str = "zero",
    ):
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule={sigma_schedule!r} is not supported; use 'karras' or 'exponential'")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'")
        self.num_inference_steps = None
        self._set_ladder(torch.arange(num_train_timesteps + 1, dtype=_ladder_dtype()) / num_train_timesteps, None)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max**2 + 1) ** 0.5

    # -- the ladder ----------------------------------------------------------------------------------------

    def _sigmas_along(self, ramp: torch.Tensor) -> torch.Tensor:
        """Sigmas at ramp positions in [0, 1], from sigma_max (0) down to sigma_min (1)."""
        c = self.config
        if c.sigma_schedule == "karras":  # eq. 5: evenly spaced in sigma^(1/rho)
            top, bottom = c.sigma_max ** (1 / c.rho), c.sigma_min ** (1 / c.rho)
            return (top + ramp * (bottom - top)) ** c.rho
        # evenly spaced in log sigma; only the ramp's length counts
        return torch.linspace(math.log(c.sigma_min), math.log(c.sigma_max), len(ramp)).exp().flip(0)

    def _set_ladder(self, ramp: torch.Tensor, device) -> None:
        sigmas = self._sigmas_along(ramp).to(dtype=torch.float32, device=device)
        self.timesteps = self.precondition_noise(sigmas)
        final = sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0
        # sigmas stay on the CPU: the step reads 0-d scalars from them, with no device round trip per step
        self.sigmas = torch.cat([sigmas, torch.full((1,), fill_value=final, device=sigmas.device)]).to("cpu")
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None):
        """Lay out ``num_inference_steps`` levels; custom ``sigmas`` are positions on the ramp in [0, 1] (0 is
        sigma_max, 1 is sigma_min), mapped through the config's sigma_schedule as the reference maps them."""
        schedule.check_schedule_args(type(self).__name__, num_inference_steps, sigmas=sigmas, takes_sigmas=True)
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        if sigmas is None:
            ramp = torch.linspace(0, 1, num_inference_steps, dtype=_ladder_dtype())
        else:
            ramp = torch.as_tensor(sigmas).to(_ladder_dtype()).reshape(-1)
        self._set_ladder(ramp, device)

    # -- preconditioning (table 1) -------------------------------------------------------------------------

    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        return sample * (1 / (sigma**2 + self.config.sigma_data**2) ** 0.5)

    def precondition_noise(self, sigma) -> torch.Tensor:
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoised sample D(x) = c_skip x + c_out F(x)."""
        sigma_data = self.config.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        elif self.config.prediction_type != "epsilon":
            raise ValueError(f"{type(self).__name__}: prediction_type={self.config.prediction_type!r} is not "
                             "supported; use 'epsilon' or 'v_prediction'")
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self.sigmas[self._step_index])

    # -- stepping ------------------------------------------------------------------------------------------

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True, pred_original_sample: torch.Tensor | None = None):
        """One Euler step; ``pred_original_sample`` (a denoised sample computed elsewhere) replaces D(x)."""
        schedule.check_float_timestep(timestep, type(self).__name__)
        if not self.is_scale_input_called:
            logger.warning("call scale_model_input before step, or the denoiser sees unscaled inputs")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        sample = sample.to(torch.float32)  # integrate in full precision
        sigma = self.sigmas[self._step_index]

        sample, sigma_hat = schedule.churn(sample, model_output, sigma, len(self.sigmas), s_churn, s_tmin, s_tmax,
                                           s_noise, generator)

        x0 = pred_original_sample
        if x0 is None:
            x0 = self.precondition_outputs(sample, model_output, sigma_hat)
        derivative = (sample - x0) / sigma_hat
        prev_sample = sample + derivative * (self.sigmas[self._step_index + 1] - sigma_hat)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
