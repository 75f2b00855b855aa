"""Heun's method on the probability-flow ODE (Karras et al., 2022, algorithm 1).

Every interval costs two model calls: an Euler step predicts the end point, then the step is redone with the
average of the slopes at both ends. The timestep list therefore holds every interior timestep twice, and
``step`` alternates between the first (Euler) and the second (correction) half.
"""

from __future__ import annotations

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule


class HeunDiscreteScheduler(SchedulerMixin, schedule.SigmaLadderMixin):
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
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        schedule.check_one_sigma_option(self.config)
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                         allowed=(*schedule.BETA_SCHEDULES, "exp"))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      num_train_timesteps: int | None = None, timesteps=None, sigmas=None):
        name = type(self).__name__
        schedule.check_schedule_args(name, num_inference_steps, timesteps, sigmas, takes_timesteps=True)
        config = self.config
        num_train_timesteps = num_train_timesteps or config.num_train_timesteps
        if timesteps is not None:
            for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if config[option]:
                    raise ValueError(f"{name}: custom timesteps= cannot be combined with {option}=True; "
                                     "turn the option off")
            schedule.check_custom_timesteps(timesteps, num_train_timesteps)
            grid = np.array(timesteps, dtype=np.float32)
        else:
            grid = schedule.spaced_timesteps(config.timestep_spacing, num_inference_steps, num_train_timesteps,
                                             config.steps_offset, integer=False)
        # the step count asked for, even where "trailing" rounding lays out one timestep more (diffusers then
        # re-spaces sigmas to the count asked for)
        num_inference_steps = num_inference_steps or len(grid)
        self.num_inference_steps = num_inference_steps

        train_sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = np.interp(grid, np.arange(len(train_sigmas)), train_sigmas)
        # sigma_min / sigma_max are not Heun options, but a config converted from Euler may carry them
        respaced = schedule.respace_sigmas(sigmas, np.log(train_sigmas), num_inference_steps, config,
                                           config.get("sigma_min"), config.get("sigma_max"))
        if respaced is not None:
            sigmas, grid = respaced
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        timesteps = torch.from_numpy(grid)

        # interior points twice: once as the end of an Euler step, once as the start of the next interval
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(device=device,
                                                                                             dtype=torch.float32)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` call starts an interval (an Euler step), False when it corrects one."""
        return self.dt is None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        if first:
            sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self._step_index - 1], self.sigmas[self._step_index]

        # the model was evaluated at sigma in the first half and at sigma_next in the second
        x0 = schedule.sigma_predict_x0(self.config.prediction_type, model_output, sample,
                                       sigma if first else sigma_next, type(self).__name__)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        if first:
            derivative = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative, self.dt, self.sample = None, None, None
        prev_sample = sample + derivative * dt
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
