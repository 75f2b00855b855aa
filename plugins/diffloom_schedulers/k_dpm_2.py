"""DPM-Solver-2 in sigma space (k-diffusion's ``sample_dpm_2``; Karras et al. 2022, algorithm 2 with the
midpoint rule of Lu et al. 2022).

Every interval [sigma_i, sigma_{i+1}] costs two model calls. An Euler step goes to the midpoint in log sigma,
sigma_mid = sqrt(sigma_i sigma_{i+1}); the slope measured there then carries the sample from sigma_i across the
whole interval. The timestep list interleaves the midpoints' fractional timesteps with the ladder's, and ``step``
alternates between the two halves. The last interval goes to sigma = 0, where the midpoint is 0 too: a single
Euler step to the denoised sample ends the run.
"""

from __future__ import annotations

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule


def doubled(values: torch.Tensor) -> torch.Tensor:
    """Repeat every entry but the first, and append the last again: the layout of a ladder walked in half steps."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


def log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(a b), taken as the halfway point between log a and log b (float32, so it rounds as the reference)."""
    return torch.lerp(torch.log(a), torch.log(b), 0.5).exp()


def sigma_to_t_float32(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """``schedule.sigma_to_t`` evaluated in float32 throughout.

    The reference converts the midpoints one 0-d float32 tensor at a time, so their timesteps keep float32
    rounding (the ladder's own timesteps are converted in float64).
    """
    sigmas = np.asarray(sigmas, dtype=np.float32)
    log_sigma = np.log(np.maximum(sigmas, np.float32(1e-10)))
    not_above = log_sigmas[None, :] <= log_sigma.reshape(-1, 1)
    last = len(log_sigmas) - 1 - np.argmax(not_above[:, ::-1], axis=1)
    low = np.clip(np.where(not_above.any(axis=1), last, 0), 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low.astype(np.float32) + w * (low + 1).astype(np.float32)).reshape(sigmas.shape)


class KDPM2Ladder(schedule.SigmaLadderMixin):
    """The training noise schedule and the inference ladder the two KDPM2 samplers share.

    ``self.sigmas`` is the ladder sigma_0 > ... > sigma_{n-1} > 0 in half steps (see ``doubled``); each
    subclass adds the midpoints it visits between the rungs.
    """

    def _build_training_schedule(self, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas):
        schedule.check_one_sigma_option(self.config)
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _ladder(self, num_inference_steps, num_train_timesteps):
        """(sigmas with a final 0 as float32, their timesteps, the log training sigmas) for a run."""
        config = self.config
        grid = schedule.spaced_timesteps(config.timestep_spacing, num_inference_steps,
                                         num_train_timesteps or config.num_train_timesteps, config.steps_offset,
                                         integer=False)
        train_sigmas = schedule.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(grid, np.arange(len(train_sigmas)), train_sigmas)
        # sigma_min / sigma_max are not KDPM2 options, but a config converted from Euler may carry them
        respaced = schedule.respace_sigmas(sigmas, log_sigmas, num_inference_steps, config,
                                           config.get("sigma_min"), config.get("sigma_max"))
        if respaced is not None:
            sigmas, grid = respaced
            if config.use_karras_sigmas:  # Karras ladders sit on whole timesteps
                grid = grid.round()
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        return sigmas, torch.from_numpy(grid), log_sigmas

    def _interleave(self, timesteps: torch.Tensor, midpoint_sigmas: torch.Tensor, log_sigmas, device):
        """The run's timesteps: the ladder's first, then (midpoint, next rung) for every interval but the last."""
        mid = torch.from_numpy(sigma_to_t_float32(midpoint_sigmas.numpy(), log_sigmas)).to(timesteps.dtype)
        pairs = torch.stack([mid, timesteps[1:]], dim=-1).flatten()
        return torch.cat([timesteps[:1], pairs]).to(device)

    def _start_run(self) -> None:
        self.sample = None
        self._step_index = None
        self._begin_index = None

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` starts an interval (the Euler half), False when it finishes one."""
        return self.sample is None

    def _scale(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        return sample / ((sigma**2 + 1) ** 0.5)

    def _predict_x0(self, model_output, sample, sigma):
        prediction_type = self.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{type(self).__name__}: prediction_type={prediction_type!r} is not supported; "
                             "use 'epsilon' or 'v_prediction'")
        return schedule.sigma_predict_x0(prediction_type, model_output, sample, sigma, type(self).__name__)


class KDPM2DiscreteScheduler(SchedulerMixin, KDPM2Ladder):
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
        # midpoints[i] lies between sigma_{i-1} and sigma_i (entry 0 pairs sigma_0 with the final 0 and is unused)
        midpoints = log_midpoint(sigmas, sigmas.roll(1))
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        self.sigmas = doubled(sigmas)
        self.sigmas_interpol = doubled(midpoints)
        self.timesteps = self._interleave(timesteps, midpoints[1:-1], log_sigmas, device)
        self._start_run()

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        return self._scale(sample, self.sigmas[i] if self.state_in_first_order else self.sigmas_interpol[i])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        i = self._step_index
        if self.state_in_first_order:
            # Euler from sigma to the midpoint, with the slope at sigma
            sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i + 1]
            x0 = self._predict_x0(model_output, sample, sigma)
            derivative = (sample - x0) / sigma
            self.sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:
            # the whole interval from the stored sample, with the slope the model gave at the midpoint
            sigma, sigma_mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
            x0 = self._predict_x0(model_output, sample, sigma_mid)
            derivative = (sample - x0) / sigma_mid
            start, self.sample = self.sample, None
            prev_sample = start + derivative * (sigma_next - sigma)
        self._step_index += 1

        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
