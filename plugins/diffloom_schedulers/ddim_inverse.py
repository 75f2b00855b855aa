"""DDIM inversion: the deterministic DDIM update (eta = 0) run backwards, from an image towards its noise.

DDIM's ODE step is invertible to first order: x at the next, noisier timestep is alpha_bar_next^(1/2) x0 +
(1 - alpha_bar_next)^(1/2) eps, with x0 and eps read from the model at the current, cleaner one. The timesteps
ascend, and each ``step(t)`` lands on t, coming from one stride below it (Mokady et al. 2022 use this to find the
noise that regenerates a given image).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule


class DDIMInverseScheduler(SchedulerMixin):
    order = 1
    # It walks the schedule from image to noise: front ends that offer samplers leave it out.
    inverts = True

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
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - {"set_alpha_to_zero"})
        if unknown:
            raise TypeError(f"DDIMInverseScheduler got unexpected arguments {unknown}")
        if kwargs.get("set_alpha_to_zero") is not None:
            # the old name of this option; like the reference, its value is taken as set_alpha_to_one's
            warnings.warn("set_alpha_to_zero is deprecated; pass set_alpha_to_one instead", FutureWarning,
                          stacklevel=3)
            set_alpha_to_one = kwargs["set_alpha_to_zero"]
        self.betas = schedule.make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = schedule.rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha_bar "before" step 0, where inversion starts: 1 (a clean image) or alpha_bar_0
        self.initial_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps).astype(np.int64))

    @classmethod
    def split_config(cls, config: dict, overrides: dict):
        # the old set_alpha_to_zero name still sets the option, from a config (which keeps the key, as the
        # reference's does) or from a keyword argument
        init_kwargs, hidden, overrides = super().split_config(config, overrides)
        if "set_alpha_to_zero" in overrides:
            init_kwargs["set_alpha_to_zero"] = overrides.pop("set_alpha_to_zero")
        elif "set_alpha_to_zero" in hidden:
            init_kwargs["set_alpha_to_zero"] = hidden["set_alpha_to_zero"]
        return init_kwargs, hidden, overrides

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        c = self.config
        if c.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"timestep_spacing={c.timestep_spacing!r} is not supported by DDIM inversion; "
                             "use 'leading' or 'trailing'")
        # DDIM's grid, ascending
        grid = schedule.spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps,
                                         c.steps_offset)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(grid[::-1].copy()).to(device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        owner = type(self).__name__
        if self.num_inference_steps is None:
            raise ValueError(f"{owner}.step called before set_timesteps; call set_timesteps(num_inference_steps)")
        c = self.config
        schedule.check_timestep_fits(timestep, c, owner)
        # the model saw the cleaner level one stride below ``timestep`` (alpha_bar = 1 or alpha_bar_0 below 0)
        current = min(timestep - c.num_train_timesteps // self.num_inference_steps, c.num_train_timesteps - 1)
        alpha_prod_current = self.alphas_cumprod[current] if current >= 0 else self.initial_alpha_cumprod
        alpha_prod_next = self.alphas_cumprod[timestep]

        x0 = schedule.predict_x0(c.prediction_type, model_output, sample, alpha_prod_current, owner)
        if c.prediction_type == "epsilon":
            eps = model_output
        elif c.prediction_type == "sample":
            eps = (sample - alpha_prod_current**0.5 * x0) / (1 - alpha_prod_current) ** 0.5
        else:  # v_prediction
            eps = alpha_prod_current**0.5 * model_output + (1 - alpha_prod_current) ** 0.5 * sample
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)

        prev_sample = alpha_prod_next**0.5 * x0 + (1 - alpha_prod_next) ** 0.5 * eps
        if not return_dict:
            return prev_sample, x0
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
