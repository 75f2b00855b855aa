"""Euler's method on the probability-flow ODE in sigma space (Karras et al., 2022, algorithm 2).

With ``s_churn > 0`` a step first adds a little noise (raising sigma to sigma_hat) and then integrates from
there: the stochastic sampler of the same paper.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule

logger = logging.getLogger(__name__)


class EulerDiscreteScheduler(SchedulerMixin, schedule.SigmaLadderMixin):
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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        schedule.check_one_sigma_option(self.config)
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = schedule.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            # a tiny positive value (the smallest fp16 subnormal) keeps the first sigma finite
            self.alphas_cumprod[-1] = 2**-24

        sigmas = torch.from_numpy(schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)[::-1].copy())
        self.num_inference_steps = None
        if self._continuous_timesteps:
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sigmas])
        else:
            self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                          dtype=float)[::-1].astype(np.float32))
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._step_index = None
        self._begin_index = None

    @property
    def _continuous_timesteps(self) -> bool:
        # v-prediction models trained with continuous time are conditioned on c_noise = log(sigma) / 4 (EDM)
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        name = type(self).__name__
        schedule.check_schedule_args(name, num_inference_steps, timesteps, sigmas,
                                     takes_timesteps=True, takes_sigmas=True)
        config = self.config
        if timesteps is not None:
            for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if config[option]:
                    raise ValueError(f"{name}: custom timesteps= cannot be combined with {option}=True; "
                                     "pass sigmas= instead or turn the option off")
            if self._continuous_timesteps:
                raise ValueError(f"{name}: custom timesteps= cannot be used with timestep_type='continuous' and "
                                 "v_prediction, whose timesteps are derived from sigmas; pass sigmas= instead")
            schedule.check_custom_timesteps(timesteps, config.num_train_timesteps)
        if sigmas is not None:
            schedule.check_custom_sigmas(sigmas)
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        self.num_inference_steps = num_inference_steps

        train_sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = schedule.sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = schedule.spaced_timesteps(config.timestep_spacing, num_inference_steps,
                                                      config.num_train_timesteps, config.steps_offset,
                                                      integer=False)
            if config.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
            elif config.interpolation_type == "log_linear":
                sigmas = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]),
                                        num_inference_steps + 1).exp().numpy()
            else:
                raise ValueError(f"interpolation_type={config.interpolation_type!r} is not supported; "
                                 "use 'linear' or 'log_linear'")
            respaced = schedule.respace_sigmas(sigmas, log_sigmas, num_inference_steps, config,
                                               config.sigma_min, config.sigma_max)
            if respaced is not None:
                sigmas, timesteps = respaced
            if config.final_sigmas_type == "sigma_min":
                last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            elif config.final_sigmas_type == "zero":
                last = 0
            else:
                raise ValueError(f"final_sigmas_type={config.final_sigmas_type!r} is not supported; "
                                 "use 'zero' or 'sigma_min'")
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if self._continuous_timesteps:
            self.timesteps = torch.Tensor([0.25 * s.log() for s in sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self.sigmas = sigmas.to("cpu")  # read every step on the host: keep them off the accelerator
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             return_dict: bool = True):
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

        # epsilon is read at the raised noise level; a v-prediction model answered for the scheduled one
        prediction_type = self.config.prediction_type
        if prediction_type == "original_sample":
            prediction_type = "sample"
        x0 = schedule.sigma_predict_x0(prediction_type, model_output, sample,
                                       sigma_hat if prediction_type == "epsilon" else sigma, type(self).__name__)

        derivative = (sample - x0) / sigma_hat  # dx/dsigma of the probability-flow ODE
        prev_sample = sample + derivative * (self.sigmas[self._step_index + 1] - sigma_hat)
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        schedule.check_float_timestep(timesteps, type(self).__name__)
        schedule_timesteps = self.timesteps.to(sample.device)
        # alpha_bar is looked up at the timestep's position in the schedule, exactly as diffusers does
        indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps.to(sample.device)]
        return schedule.vp_velocity(self.alphas_cumprod, sample, noise, torch.tensor(indices))
