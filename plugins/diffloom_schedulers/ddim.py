"""DDIM: the non-Markovian sampler of Song et al. (2021); eta = 0 is deterministic, eta = 1 recovers DDPM."""

from __future__ import annotations

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule


class DDIMScheduler(SchedulerMixin):
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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = schedule.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha_bar "before" step 0: 1 (a clean image) or, as some checkpoints were trained, alpha_bar_0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy().astype(np.int64))

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        schedule.check_schedule_args(type(self).__name__, num_inference_steps, timesteps, sigmas)
        grid = schedule.spaced_timesteps(self.config.timestep_spacing, num_inference_steps,
                                         self.config.num_train_timesteps, self.config.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(grid).to(device)

    def _alpha_bar_prev(self, prev_timestep):
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep, prev_timestep):
        """sigma_t^2 / eta^2 of eq. 16: the DDPM posterior variance between the two visited timesteps."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self._alpha_bar_prev(prev_timestep)
        return ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_prev)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step called before set_timesteps; call set_timesteps(num_inference_steps)")
        schedule.check_timestep_fits(timestep, self.config, type(self).__name__)
        # the grid is evenly spaced, so the next timestep is a fixed stride below
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self._alpha_bar_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t

        prediction_type = self.config.prediction_type
        x0 = schedule.predict_x0(prediction_type, model_output, sample, alpha_prod_t, "DDIMScheduler")
        if prediction_type == "epsilon":
            eps = model_output
        elif prediction_type == "sample":
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
        else:  # v_prediction
            eps = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        x0 = schedule.clip_x0(x0, self.config)

        std = eta * self._get_variance(timestep, prev_timestep) ** 0.5
        if use_clipped_model_output:  # re-derive eps from the clipped x0, as in GLIDE
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5

        # eq. 12: predicted x0, the "direction pointing to x_t", then fresh noise
        prev_sample = alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev - std**2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step got both generator= and variance_noise=; pass only one")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std * variance_noise

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_velocity(self.alphas_cumprod, sample, noise, timesteps)
