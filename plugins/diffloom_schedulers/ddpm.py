"""DDPM: ancestral sampling of the reverse diffusion chain (Ho et al., 2020)."""

from __future__ import annotations

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(SchedulerMixin):
    """Each step samples x_{t-1} from the Gaussian posterior q(x_{t-1} | x_t, x0) with x0 predicted by the model."""

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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        # None is what other schedulers' configs carry; diffusers then samples as "fixed_small".
        if variance_type is not None and variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type={variance_type!r} is not supported; choose one of {list(VARIANCE_TYPES)}")
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                         allowed=(*schedule.BETA_SCHEDULES, "laplace", "sigmoid"))
        if rescale_betas_zero_snr:
            self.betas = schedule.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        schedule.check_schedule_args(type(self).__name__, num_inference_steps, timesteps, sigmas,
                                     takes_timesteps=True)
        T = self.config.num_train_timesteps
        if timesteps is not None:
            schedule.check_custom_timesteps(timesteps, T)
            grid = np.array(timesteps, dtype=np.int64)
        else:
            grid = schedule.spaced_timesteps(self.config.timestep_spacing, num_inference_steps, T,
                                             self.config.steps_offset)
        self.custom_timesteps = timesteps is not None
        # the step count asked for, even where "trailing" rounding lays out one timestep more
        self.num_inference_steps = len(grid) if self.custom_timesteps else num_inference_steps
        self.timesteps = torch.from_numpy(grid).to(device)

    def previous_timestep(self, timestep):
        """The next timestep the loop visits (-1 after the last one); t - 1 before set_timesteps."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return self.timesteps[index + 1] if index < len(self.timesteps) - 1 else torch.tensor(-1)

    def _alpha_bars(self, t):
        prev_t = self.previous_timestep(t)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        return alpha_prod_t, alpha_prod_prev

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """Variance of the step's noise; "*_log" and "learned*" variants return what ``step`` expects of them."""
        alpha_prod_t, alpha_prod_prev = self._alpha_bars(t)
        beta_t = 1 - alpha_prod_t / alpha_prod_prev
        # posterior variance beta~_t (eq. 7); clamped so its log stays finite at the last step
        posterior = torch.clamp((1 - alpha_prod_prev) / (1 - alpha_prod_t) * beta_t, min=1e-20)
        variance_type = variance_type or self.config.variance_type or "fixed_small"
        if variance_type == "fixed_small":
            return posterior
        if variance_type == "fixed_small_log":  # a standard deviation, computed through the log
            return torch.exp(0.5 * torch.log(posterior))
        if variance_type == "fixed_large":
            return beta_t
        if variance_type == "fixed_large_log":
            return torch.log(beta_t)
        if variance_type == "learned":
            return predicted_variance
        # learned_range (Nichol & Dhariwal eq. 15): the model interpolates between the two log variances
        frac = (predicted_variance + 1) / 2
        return frac * torch.log(beta_t) + (1 - frac) * torch.log(posterior)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        t = timestep
        schedule.check_timestep_fits(t, self.config, type(self).__name__)
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        alpha_prod_t, alpha_prod_prev = self._alpha_bars(t)
        alpha_t = alpha_prod_t / alpha_prod_prev
        beta_t = 1 - alpha_t
        x0 = schedule.predict_x0(self.config.prediction_type, model_output, sample, alpha_prod_t, "DDPMScheduler")
        x0 = schedule.clip_x0(x0, self.config)

        # posterior mean mu~_t(x_t, x0), eq. 7
        x0_coeff = alpha_prod_prev**0.5 * beta_t / (1 - alpha_prod_t)
        sample_coeff = alpha_t**0.5 * (1 - alpha_prod_prev) / (1 - alpha_prod_t)
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        if t > 0:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            variance = self._get_variance(t, predicted_variance)
            if self.variance_type == "fixed_small_log":
                std = variance
            elif self.variance_type == "learned_range":
                std = torch.exp(0.5 * variance)
            else:
                std = variance**0.5
            prev_sample = prev_sample + std * noise

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_velocity(self.alphas_cumprod, sample, noise, timesteps)
