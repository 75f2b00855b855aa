"""Ancestral DPM-Solver-2 (k-diffusion's ``sample_dpm_2_ancestral``).

As in ``k_dpm_2``, but every interval aims below the next rung: the deterministic two-stage step goes from
sigma_i down to sigma_down, through the log-midpoint of sigma_i and sigma_down, and fresh noise of size sigma_up
then brings the sample back up to sigma_{i+1} (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2, as in ancestral Euler).
"""

from __future__ import annotations

import torch

from diffloom.configuration import register_to_config
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule
from .k_dpm_2 import KDPM2Ladder, doubled, log_midpoint


class KDPM2AncestralDiscreteScheduler(SchedulerMixin, KDPM2Ladder):
    _compatibles = schedule.KARRAS_COMPATIBLES
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        self._build_training_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      num_train_timesteps: int | None = None):
        schedule.check_schedule_args(type(self).__name__, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        sigmas, timesteps, log_sigmas = self._ladder(num_inference_steps, num_train_timesteps)
        # entry i describes the interval from sigma_i to sigma_{i+1}; past the ladder's end there is none
        sigmas_next = torch.cat([sigmas[1:], sigmas.new_zeros(1)])
        sigmas_up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
        sigmas_down = (sigmas_next**2 - sigmas_up**2) ** 0.5
        sigmas_up[-1] = sigmas_down[-1] = 0.0
        midpoints = log_midpoint(sigmas, sigmas_down)
        midpoints[-2:] = 0.0  # the last interval ends at sigma = 0: its midpoint is 0 too
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        self.sigmas = doubled(sigmas)
        self.sigmas_interpol = doubled(midpoints)
        self.sigmas_up = doubled(sigmas_up)
        self.sigmas_down = doubled(sigmas_down)
        self.timesteps = self._interleave(timesteps, midpoints[:-2], log_sigmas, device)
        self._start_run()

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        return self._scale(sample, self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i - 1])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        i = self._step_index
        if self.state_in_first_order:
            # Euler from sigma to the midpoint, with the slope at sigma
            sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i]
            x0 = self._predict_x0(model_output, sample, sigma)
            derivative = (sample - x0) / sigma
            self.sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:
            # from the stored sample down to sigma_down with the midpoint's slope, then noise up to sigma_next
            sigma, sigma_mid = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            sigma_up, sigma_down = self.sigmas_up[i - 1], self.sigmas_down[i - 1]
            x0 = self._predict_x0(model_output, sample, sigma_mid)
            derivative = (sample - x0) / sigma_mid
            start, self.sample = self.sample, None
            prev_sample = start + derivative * (sigma_down - sigma)
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
