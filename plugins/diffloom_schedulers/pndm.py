"""PNDM: pseudo numerical methods for diffusion models (Liu et al., 2022).

The model's noise prediction is treated as the derivative of a transfer function; a few Runge-Kutta (PRK)
steps warm up the history that the linear multistep (PLMS, Adams-Bashforth) steps then reuse, one model call
per step. With ``skip_prk_steps`` the warm-up uses lower-order PLMS steps instead (as Stable Diffusion does).
"""

from __future__ import annotations

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule


class PNDMScheduler(SchedulerMixin):
    _compatibles = schedule.KARRAS_COMPATIBLES
    order = 1
    pndm_order = 4  # fourth-order Runge-Kutta warm-up and four-point Adams-Bashforth

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._reset_history()

    def _reset_history(self):
        self.counter = 0
        self.ets = []  # past noise predictions, oldest first
        self.cur_model_output = 0  # running Runge-Kutta sum
        self.cur_sample = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        schedule.check_schedule_args(type(self).__name__, num_inference_steps, timesteps, sigmas)
        T = self.config.num_train_timesteps
        if not self.config.skip_prk_steps and num_inference_steps < self.pndm_order:
            raise ValueError(f"PNDMScheduler needs num_inference_steps >= {self.pndm_order} for its Runge-Kutta "
                             f"warm-up, got {num_inference_steps}; use more steps or skip_prk_steps=True")
        self.num_inference_steps = num_inference_steps
        grid = schedule.spaced_timesteps(self.config.timestep_spacing, num_inference_steps, T,
                                         self.config.steps_offset)[::-1]  # ascending from here on
        if self.config.skip_prk_steps:
            # the last grid point is visited twice: the first PLMS step is a two-evaluation (Heun-like) step
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([grid[:-1], grid[-2:-1], grid[-1:]])[::-1].copy()
        else:
            # RK4 over the top three intervals: each needs t, the midpoint twice, and t - stride
            half = T // num_inference_steps // 2
            top = grid[-self.pndm_order:]
            with_mid = (top.repeat(2) + np.tile([0, half], self.pndm_order))[:-1]
            self.prk_timesteps = with_mid.repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = grid[:-3][::-1].copy()
        self.timesteps = torch.from_numpy(
            np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)).to(device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def _check_ready(self):
        if self.num_inference_steps is None:
            raise ValueError("PNDMScheduler.step called before set_timesteps; call set_timesteps(num_inference_steps)")

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One of the four stages of a Runge-Kutta step; every stage starts from the sample at the step's start."""
        self._check_ready()
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        prev_timestep = timestep - (0 if self.counter % 2 else half)
        timestep = self.prk_timesteps[self.counter // 4 * 4]
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        else:  # RK4 weights 1/6, 1/3, 1/3, 1/6
            model_output = self.cur_model_output + (1 / 6) * model_output
            self.cur_model_output = 0
        start = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(start, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """A linear multistep step: Adams-Bashforth over up to four past noise predictions."""
        self._check_ready()
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler.step_plms needs the Runge-Kutta warm-up first (12 step_prk calls); "
                             "call step() from the first timestep, or set skip_prk_steps=True")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        prev_timestep = timestep - stride
        if self.counter == 1:
            # second evaluation of the opening step: same interval as the first one
            prev_timestep, timestep = timestep, timestep + stride
        else:
            self.ets = [*self.ets[-3:], model_output]

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:  # Heun-like average of both evaluations
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        """x_{t-delta} from x_t and a noise estimate: the transfer function phi of eq. 11 in the PNDM paper."""
        schedule.check_timestep_fits(timestep, self.config, type(self).__name__)
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_prev = 1 - alpha_prod_prev
        if self.config.prediction_type == "v_prediction":
            model_output = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample  # back to eps
        elif self.config.prediction_type != "epsilon":
            raise ValueError(f"PNDMScheduler: prediction_type={self.config.prediction_type!r} is not supported; "
                             "use 'epsilon' or 'v_prediction'")
        sample_coeff = (alpha_prod_prev / alpha_prod_t) ** 0.5
        denominator = alpha_prod_t * beta_prod_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_prev - alpha_prod_t) * model_output / denominator

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        return schedule.vp_add_noise(self.alphas_cumprod, original_samples, noise, timesteps)
