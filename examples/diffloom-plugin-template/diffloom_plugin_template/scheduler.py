"""A deterministic DDIM scheduler (Song et al. 2020, eta = 0) over a linear beta schedule.

It implements the scheduler contract of ``diffloom.scheduling``: ``set_timesteps``, ``scale_model_input``,
``step`` and ``add_noise``, with diffusers' signatures, and records its arguments with ``register_to_config`` so
``save_pretrained`` / ``from_pretrained`` write and read ``scheduler_config.json``.
"""

import torch

from diffloom import SchedulerMixin, SchedulerOutput, register_to_config


class TemplateDDIMScheduler(SchedulerMixin):
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)

    def set_timesteps(self, num_inference_steps: int, device=None):
        stride = self.config.num_train_timesteps // num_inference_steps
        self.num_inference_steps = num_inference_steps
        self.timesteps = (torch.arange(num_inference_steps - 1, -1, -1) * stride).to(device)

    def scale_model_input(self, sample, timestep=None):
        return sample

    def _alpha_bar(self, timestep):
        return self.alphas_cumprod[timestep] if timestep >= 0 else torch.tensor(1.0, dtype=torch.float64)

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = self._alpha_bar(t).item(), self._alpha_bar(prev_t).item()
        # Predict the clean sample, then move to the previous noise level along the same predicted noise.
        x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
        prev_sample = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * model_output
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps):
        a = self.alphas_cumprod.to(original_samples.device)[timesteps].to(original_samples.dtype)
        a = a.reshape(-1, *([1] * (original_samples.dim() - 1)))
        return a.sqrt() * original_samples + (1 - a).sqrt() * noise
