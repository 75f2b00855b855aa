"""Ancestral Euler sampling (k-diffusion's ``sample_euler_ancestral``).

Each step goes deterministically down to sigma_down, then adds fresh noise of size sigma_up, such that the
noise variances add up to the next scheduled sigma: sigma_down^2 + sigma_up^2 = sigma_next^2.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule

logger = logging.getLogger(__name__)


class EulerAncestralDiscreteScheduler(SchedulerMixin, schedule.SigmaLadderMixin):
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
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = schedule.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keeps the first sigma finite

        sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy())
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

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
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(grid).to(device=device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        name = type(self).__name__
        schedule.check_float_timestep(timestep, name)
        if self.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{name}: prediction_type={self.config.prediction_type!r} is not supported; "
                             "use 'epsilon' or 'v_prediction'")
        if not self.is_scale_input_called:
            logger.warning("call scale_model_input before step, or the denoiser sees unscaled inputs")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        sample = sample.to(torch.float32)
        x0 = schedule.sigma_predict_x0(self.config.prediction_type, model_output, sample, sigma, name)

        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
