"""TCD: strategic stochastic sampling for trajectory consistency distillation (Zheng et al. 2024, arXiv:2402.19159).

A TCD model predicts x0 and eps from any x_t, so the sampler can jump along the probability-flow trajectory to any
earlier time. Each step goes deterministically (DDIM) from t to s = floor((1 - gamma) t_next), then forward-noises
from s back up to the next timestep t_next with fresh noise. gamma (``eta``) = 0 is the deterministic trajectory
(s = t_next); gamma = 1 denoises fully and re-noises, like LCM. The timesteps are the LCM ones: a subset of the
distillation schedule.
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
class TCDSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor = None
    pred_noised_sample: torch.Tensor | None = None  # the deterministic point at time s, before fresh noise


class TCDScheduler(SchedulerMixin, schedule.StepIndexMixin):
    order = 1

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
        # clip_sample, thresholding, timestep_spacing and the like are kept for configs shared with LCM; as in the
        # reference, TCD's sampling does not use them.
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
                      original_inference_steps: int | None = None, timesteps=None, strength: float = 1.0):
        """The run's timesteps: ``num_inference_steps`` evenly picked from the distillation schedule (every
        T / original_inference_steps-th training step), or custom ``timesteps``; ``strength`` < 1 (img2img) keeps
        the lower part of the schedule."""
        owner = type(self).__name__
        schedule.check_schedule_args(owner, num_inference_steps, timesteps, takes_timesteps=True)
        T = self.config.num_train_timesteps
        if original_inference_steps is None:
            original_steps = self.config.original_inference_steps
            if original_steps > T:
                raise ValueError(f"original_inference_steps={original_steps} is larger than num_train_timesteps={T}")
            k = T // original_steps
            origin = np.arange(1, int(original_steps * strength) + 1) * k - 1
        else:
            # an explicit original_inference_steps makes every training step a candidate (the reference's rule)
            original_steps = original_inference_steps
            origin = np.arange(int(T * strength))

        if timesteps is not None:
            schedule.check_custom_timesteps(timesteps, T)
            self._warn_about_custom(timesteps, origin, original_steps, strength, T)
            grid = np.array(timesteps, dtype=np.int64)
            count = len(grid)
            keep = min(int(count * strength), count)
            grid = grid[max(count - keep, 0) * self.order:]
            self.num_inference_steps = count
        else:
            n = num_inference_steps
            if n > T:
                raise ValueError(f"num_inference_steps={n} is larger than num_train_timesteps={T}")
            if len(origin) // n < 1:
                raise ValueError(
                    f"original_inference_steps x strength = {original_steps} x {strength} leaves fewer timesteps "
                    f"than num_inference_steps={n}; lower num_inference_steps to at most "
                    f"{int(original_steps * strength)} or raise strength to at least {n / original_steps}")
            if n > original_steps:
                raise ValueError(f"num_inference_steps={n} is larger than original_inference_steps="
                                 f"{original_steps}: TCD samples a subset of that schedule")
            origin = origin[::-1]
            picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
            grid = origin[picks]
            self.num_inference_steps = n
        self.custom_timesteps = timesteps is not None
        self.timesteps = torch.from_numpy(np.ascontiguousarray(grid)).to(device=device, dtype=torch.long)
        self._step_index = None
        self._begin_index = None

    @staticmethod
    def _warn_about_custom(timesteps, origin, original_steps, strength, num_train_timesteps):
        if strength == 1.0 and timesteps[0] != num_train_timesteps - 1:
            logger.warning("custom TCD timesteps start at %s, not at num_train_timesteps - 1 = %d; "
                           "results may suffer", timesteps[0], num_train_timesteps - 1)
        on_schedule = set(origin.tolist())
        off_schedule = [t for t in list(timesteps)[1:] if t not in on_schedule]
        if off_schedule:
            logger.warning("custom TCD timesteps %s are not on the distillation schedule; results may suffer",
                           off_schedule)
        if len(timesteps) > original_steps:
            logger.warning("%d custom TCD timesteps exceed original_inference_steps=%d; results may suffer",
                           len(timesteps), original_steps)

    def previous_timestep(self, timestep):
        """The next timestep the loop visits (-1 after the last one); t - 1 before set_timesteps."""
        if self.num_inference_steps is None:
            return timestep - 1
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return self.timesteps[index + 1] if index < len(self.timesteps) - 1 else torch.tensor(-1)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.3, generator=None,
             return_dict: bool = True):
        """One TCD step; ``eta`` is the paper's gamma, the share of the way to the next timestep that is re-noised."""
        owner = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{owner}.step called before set_timesteps; call set_timesteps(num_inference_steps)")
        if not 0 <= eta <= 1:
            raise ValueError(f"{owner}.step got eta={eta}; eta (gamma in the TCD paper) must lie in [0, 1]")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        next_index = self._step_index + 1
        next_timestep = self.timesteps[next_index] if next_index < len(self.timesteps) else torch.tensor(0)
        # s: where the deterministic part of the step lands (float32 product, as the reference rounds it)
        timestep_s = torch.floor((1 - eta) * next_timestep).to(dtype=torch.long)

        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_next = self.alphas_cumprod[next_timestep]
        alpha_prod_s = self.alphas_cumprod[timestep_s]
        prediction_type = self.config.prediction_type
        x0 = schedule.predict_x0(prediction_type, model_output, sample, alpha_prod_t, owner)
        if prediction_type == "epsilon":
            eps = model_output
        elif prediction_type == "sample":
            eps = (sample - alpha_prod_t**0.5 * x0) / (1 - alpha_prod_t) ** 0.5
        else:  # v_prediction
            eps = alpha_prod_t**0.5 * model_output + (1 - alpha_prod_t) ** 0.5 * sample
        # DDIM from t to s along the predicted trajectory
        noised = alpha_prod_s.sqrt() * x0 + (1 - alpha_prod_s).sqrt() * eps

        if eta > 0 and self._step_index != self.num_inference_steps - 1:
            # forward process from s up to the next timestep
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=noised.dtype)
            ratio = alpha_prod_next / alpha_prod_s
            prev_sample = ratio.sqrt() * noised + (1 - ratio).sqrt() * noise
        else:
            prev_sample = noised
        self._step_index += 1

        if not return_dict:
            return prev_sample, noised
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=noised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_velocity(self.alphas_cumprod, sample, noise, timesteps)
