"""Singlestep DPM-Solver (Lu et al. 2022, arXiv:2206.00927, algorithms 1-3) and DPM-Solver++ (arXiv:2211.01095).

A k-th order singlestep solver crosses k ladder intervals as one block: it keeps the sample from the block's
start s and evaluates the model at the intermediate levels, and each step of the block re-integrates from s with
every model output seen since. In lambda = log(alpha / sigma), with h = lambda_t - lambda_s, the update is the
multistep one (see dpmsolver_multistep.py) expanded around the block's start instead of the newest output:

    D0 = m(s),  D1 ~ h m'(s),  D2 ~ h^2 m''(s)

from divided differences over the block's outputs, weighted by J_k(z) = z phi_{k+1}(z) with z = -h (dpmsolver++),
-2h (sde-dpmsolver++) or h (dpmsolver). The "midpoint" solvers drop the highest difference and use the next
weight down for it (J_0 / 2 at order 2, J_1 at order 3), as the paper's DPM-Solver-2 and -3 do.

``order_list`` fixes the block layout for a run: 1, 2, ..., k repeated, ending with a shorter block when the steps
do not divide evenly (and always on a first-order step into sigma = 0, where lambda is infinite).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule
from .dpmsolver_multistep import exp_integrator_weights
from .schedule import VPMultistepMixin

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


class DPMSolverSinglestepScheduler(VPMultistepMixin, SchedulerMixin):
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
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        # Names the other multistep families use for these settings, so their configs load here.
        if algorithm_type == "deis":
            if final_sigmas_type == "zero":
                # diffusers refuses this pair: it checks the name as given, before reading it as dpmsolver++
                raise ValueError("algorithm_type='deis' (read as 'dpmsolver++') does not take final_sigmas_type="
                                 "'zero'; pass final_sigmas_type='sigma_min' or algorithm_type='dpmsolver++'")
            self.register_to_config(algorithm_type="dpmsolver++")
        elif algorithm_type not in ALGORITHMS:
            raise ValueError(f"algorithm_type={algorithm_type!r} is not supported by the singlestep solver; choose "
                             f"one of {list(ALGORITHMS)} (sde-dpmsolver runs in DPMSolverMultistepScheduler)")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type={solver_type!r} is not supported; choose one of {list(SOLVER_TYPES)}")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order!r} is not supported; DPM-Solver has orders 1, 2 and 3")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'")
        if not self._predicts_data and final_sigmas_type == "zero":
            # The noise prediction carries no information at sigma = 0: that variant must stop at sigma_min.
            raise ValueError(f"final_sigmas_type='zero' does not work with algorithm_type={algorithm_type!r}; "
                             "pass final_sigmas_type='sigma_min' or use 'dpmsolver++' / 'sde-dpmsolver++'")
        if not self._predicts_data and prediction_type == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs a data-prediction solver; use algorithm_type="
                             "'dpmsolver++' or 'sde-dpmsolver++' instead of 'dpmsolver'")
        self._build_noise_schedule()
        self.order_list = self.get_order_list(num_train_timesteps)

    @property
    def _predicts_data(self) -> bool:
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.sample = None  # the sample at the start of the current block
        self._lower_order_final = self.config.lower_order_final

    # -- schedule ------------------------------------------------------------------------------------------

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The solver order of every step: blocks 1, 2, ..., solver_order."""
        k, n = self.config.solver_order, num_inference_steps
        block = list(range(1, k + 1))
        full, rest = divmod(n, k)
        if not self._lower_order_final:
            orders = block * full
        elif rest == 0 and k > 1:
            # a run that divides evenly still ends on a shorter block and a first-order step
            orders = block * (full - 1) + block[:-1] + [1]
        else:
            orders = block * full + block[:rest]
        if self.config.final_sigmas_type == "zero":
            orders[-1] = 1  # lambda is infinite at sigma = 0: only the first-order step has a limit there
        return orders

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None):
        """Lay out the run; ``timesteps`` gives a custom descending schedule instead of ``num_inference_steps``.

        ``mu`` (with ``use_dynamic_shifting``) sets the flow shift to exp(mu) for this run only.
        """
        c = self.config
        owner = type(self).__name__
        schedule.check_schedule_args(owner, num_inference_steps, timesteps, takes_timesteps=True)
        shift = c.flow_shift
        if mu is not None:
            if not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
                raise ValueError(f"{owner}.set_timesteps got mu={mu}, which needs use_dynamic_shifting=True and "
                                 "time_shift_type='exponential' in the config")
            shift = math.exp(mu)

        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"):
                if c[flag]:
                    raise ValueError(f"custom timesteps cannot be used with {flag}=True, which lays out its own "
                                     "schedule; pass num_inference_steps instead")
            schedule.check_custom_timesteps(timesteps, c.num_train_timesteps)
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            # Leave out the noisiest timesteps whose lambda is below lambda_min_clipped (for the cosine schedule).
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
            if clipped == c.num_train_timesteps:
                # diffusers lays out negative timesteps here and fails with IndexError during the run
                raise ValueError(f"lambda_min_clipped={c.lambda_min_clipped} is above log(alpha / sigma) of every "
                                 f"training step (at most {self.lambda_t[0].item():.3g}), so no timestep is left "
                                 "to sample; pass a smaller lambda_min_clipped (-5.1 suits the cosine schedule)")
            timesteps = schedule.multistep_timesteps("linspace", num_inference_steps, c.num_train_timesteps,
                                                     last_timestep=c.num_train_timesteps - clipped)
        n = len(timesteps)

        train_sigmas, log_sigmas = self._training_log_sigmas()
        # sigma_min / sigma_max are not DPM-Solver options, but a config converted from Euler may carry them
        bounds = dict(sigma_min=c.get("sigma_min"), sigma_max=c.get("sigma_max"))
        if c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas:
            sigmas = schedule.convert_sigmas(np.flip(train_sigmas), n, c.use_karras_sigmas, c.use_exponential_sigmas,
                                             c.use_beta_sigmas, **bounds)
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
            if c.use_karras_sigmas:  # Karras ladders sit on whole timesteps (the others are truncated)
                timesteps = timesteps.round()
        elif c.use_flow_sigmas:
            sigmas = schedule.shifted_flow_sigmas(n, c.num_train_timesteps, shift)
            timesteps = sigmas * c.num_train_timesteps
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)

        final = train_sigmas[0].item() if c.final_sigmas_type == "sigma_min" else 0.0
        self._store_run_schedule(timesteps, np.concatenate([sigmas, [final]]), device)
        # Blocks must tile the run, and a run into sigma = 0 must end on a first-order step: otherwise the last
        # block is shortened (diffusers also rewrites lower_order_final=True into the config; we keep the config).
        if n % c.solver_order or c.final_sigmas_type == "zero":
            self._lower_order_final = True
        self.order_list = self.get_order_list(n)

    # -- stepping ------------------------------------------------------------------------------------------

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The quantity this variant integrates: the data prediction x0 (`++`) or the noise prediction eps."""
        model_output = self._mean_output(model_output, sample)
        if self._predicts_data:
            return self._data_prediction(model_output, sample)
        return self._noise_prediction(model_output, sample)

    def _update(self, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        """Integrate from the block's start (``order - 1`` steps back) to the next ladder entry."""
        c = self.config
        i = self._step_index
        s = i - order + 1
        alpha_t, sd_t = self._alpha_sigma(i + 1)
        alpha_s, sd_s = self._alpha_sigma(s)
        lam_s = self._lambda(s)
        h = self._lambda(i + 1) - lam_s
        if h == 0:
            # A zero-length block (a repeated sigma) leaves the sample as it is; the differences below divide by h.
            return self.sample
        if c.algorithm_type == "sde-dpmsolver++" and h < 0:
            # The fresh noise has variance sigma_t^2 (1 - e^{-2h}): negative when the noise level rises.
            raise ValueError(f"algorithm_type='sde-dpmsolver++' cannot step from sigma {self.sigmas[s]:g} up to "
                             f"{self.sigmas[i + 1]:g}: the noise it adds would have negative variance. With "
                             "use_flow_sigmas=True, final_sigmas_type='sigma_min' ends above the last flow sigma; "
                             "pass final_sigmas_type='zero'")

        # Divided differences around the block's start s, each scaled by h; r = (lambda_u - lambda_s) / h.
        m = self.model_outputs[::-1]  # newest first: m[order - 1] was predicted at s
        D = [m[order - 1]]
        if order == 2:
            r0 = (self._lambda(i) - lam_s) / h
            D.append((1.0 / r0) * (m[0] - m[1]))
        elif order == 3:
            r0, r1 = (self._lambda(i) - lam_s) / h, (self._lambda(i - 1) - lam_s) / h
            slope_1 = (1.0 / r1) * (m[1] - m[2])  # from the block's middle output
            slope_0 = (1.0 / r0) * (m[0] - m[2])  # from its newest
            if c.solver_type == "midpoint":
                D.append(slope_0)
            else:
                D.append((r0 * slope_1 - r1 * slope_0) / (r0 - r1))
                D.append(2.0 * (slope_0 - slope_1) / (r0 - r1))

        algo = c.algorithm_type
        if algo == "dpmsolver++":
            linear, scale, z = sd_t / sd_s, -alpha_t, -h
        elif algo == "sde-dpmsolver++":
            linear, scale, z = sd_t / sd_s * torch.exp(-h), -alpha_t, -2.0 * h
        else:
            linear, scale, z = alpha_t / alpha_s, -sd_t, h
        weights = [scale * j for j in exp_integrator_weights(z, len(D))]
        if order == 2 and c.solver_type == "midpoint":
            weights[1] = 0.5 * weights[0]

        x = linear * self.sample
        for w, d in zip(weights, D):
            x = x + w * d
        if algo == "sde-dpmsolver++":
            x = x + sd_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise
        return x

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """Advance ``sample`` one step; sde-dpmsolver++ draws its noise from ``generator``."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps; "
                             "call set_timesteps(num_inference_steps) first")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        converted = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [converted]
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn_tensor(converted.shape, generator=generator, device=converted.device, dtype=converted.dtype)

        # a block started mid-way (img2img) has fewer outputs than its order asks for
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:
            self.sample = sample
        # unlike the multistep solvers, this one computes in the sample's own precision, as the reference does
        prev_sample = self._update(order, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
