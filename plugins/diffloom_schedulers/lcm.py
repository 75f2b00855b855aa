"""LCM: multistep sampling for latent consistency models (Luo et al., 2023).

A consistency model maps any x_t straight to x0. Each step takes that estimate (through the boundary-condition
parameterisation c_skip * x_t + c_out * x0) and, unless it is the last step, re-noises it to the next timestep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.outputs import BaseOutput
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin

from . import schedule

logger = logging.getLogger(__name__)


@dataclass
class LCMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor = None
    denoised: torch.Tensor | None = None

    @property
    def pred_original_sample(self) -> torch.Tensor | None:
        """The denoised estimate, under the name other schedulers use."""
        return self.denoised


class LCMScheduler(SchedulerMixin, schedule.StepIndexMixin):
    order = 1
    sigma_data = 0.5  # data standard deviation assumed by the boundary-condition scalings

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = schedule.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy().astype(np.int64))
        self._step_index = None
        self._begin_index = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      original_inference_steps: int | None = None, timesteps=None, strength: float = 1.0,
                      sigmas=None):
        schedule.check_schedule_args(type(self).__name__, num_inference_steps, timesteps, sigmas,
                                     takes_timesteps=True)
        T = self.config.num_train_timesteps
        original_steps = (original_inference_steps if original_inference_steps is not None
                          else self.config.original_inference_steps)
        if original_steps > T:
            raise ValueError(f"original_inference_steps={original_steps} is larger than num_train_timesteps={T}")
        # the distillation schedule: every k-th training step, truncated by img2img strength
        k = T // original_steps
        origin = np.arange(1, int(original_steps * strength) + 1) * k - 1

        if timesteps is not None:
            schedule.check_custom_timesteps(timesteps, T)
            self._warn_about_custom(timesteps, origin, original_steps, strength, T)
            grid = np.array(timesteps, dtype=np.int64)
            count = len(grid)
            keep = min(int(count * strength), count)
            grid = grid[max(count - keep, 0) * self.order:]
            self.num_inference_steps = count
        else:
            if num_inference_steps > T:
                raise ValueError(f"num_inference_steps={num_inference_steps} is larger than num_train_timesteps={T}")
            if len(origin) // num_inference_steps < 1:
                raise ValueError(
                    f"original_inference_steps x strength = {original_steps} x {strength} leaves fewer timesteps "
                    f"than num_inference_steps={num_inference_steps}; lower num_inference_steps to at most "
                    f"{int(original_steps * strength)} or raise strength to at least "
                    f"{num_inference_steps / original_steps}")
            if num_inference_steps > original_steps:
                raise ValueError(f"num_inference_steps={num_inference_steps} is larger than "
                                 f"original_inference_steps={original_steps}: LCM samples a subset of that schedule")
            origin = origin[::-1]
            picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
            grid = origin[picks]
            self.num_inference_steps = num_inference_steps
        self.custom_timesteps = timesteps is not None
        self.timesteps = torch.from_numpy(np.ascontiguousarray(grid)).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _warn_about_custom(timesteps, origin, original_steps, strength, num_train_timesteps):
        if strength == 1.0 and timesteps[0] != num_train_timesteps - 1:
            logger.warning("custom LCM timesteps start at %s, not at num_train_timesteps - 1 = %d; "
                           "results may suffer", timesteps[0], num_train_timesteps - 1)
        on_schedule = set(origin.tolist())
        off_schedule = [t for t in list(timesteps)[1:] if t not in on_schedule]
        if off_schedule:
            logger.warning("custom LCM timesteps %s are not on the distillation schedule; results may suffer",
                           off_schedule)
        if len(timesteps) > original_steps:
            logger.warning("%d custom LCM timesteps exceed original_inference_steps=%d; results may suffer",
                           len(timesteps), original_steps)

    def previous_timestep(self, timestep):
        """The next timestep the loop visits (-1 after the last one); t - 1 before set_timesteps."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return self.timesteps[index + 1] if index < len(self.timesteps) - 1 else torch.tensor(-1)

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """c_skip and c_out: x0 estimate = c_skip * x_t + c_out * f(x_t), with c_skip -> 1 as t -> 0."""
        scaled = timestep * self.config.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        if self.num_inference_steps is None:
            raise ValueError("LCMScheduler.step called before set_timesteps; call set_timesteps(num_inference_steps)")
        if self._step_index is None:
            self._init_step_index(timestep)
        next_index = self._step_index + 1
        prev_timestep = self.timesteps[next_index] if next_index < len(self.timesteps) else timestep

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        x0 = schedule.predict_x0(self.config.prediction_type, model_output, sample, alpha_prod_t, "LCMScheduler")
        x0 = schedule.clip_x0(x0, self.config)
        denoised = c_out * x0 + c_skip * sample

        if self._step_index != self.num_inference_steps - 1:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=denoised.dtype)
            prev_sample = alpha_prod_prev.sqrt() * denoised + (1 - alpha_prod_prev).sqrt() * noise
        else:
            prev_sample = denoised
        self._step_index += 1

        if not return_dict:
            return prev_sample, denoised
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_velocity(self.alphas_cumprod, sample, noise, timesteps)
