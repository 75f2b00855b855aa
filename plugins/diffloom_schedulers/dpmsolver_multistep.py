"""Multistep DPM-Solver (Lu et al. 2022, arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095), ODE and SDE.

All four variants share one update. In lambda = log(alpha / sigma), the sample moves from s to t (h = lambda_t -
lambda_s) by an exactly integrated linear part plus an integral of the model's prediction, which is expanded
around s from the last few outputs: D0 = m(s), D1 ~ h m'(s), D2 ~ h^2 m''(s). The integral of the k-th term is
the exponential-integrator weight J_k(z) = z phi_{k+1}(z), with z set by the variant:

    dpmsolver++      x_t = (sigma_t / sigma_s) x_s                - alpha_t   sum_k J_k(-h)  D_k
    sde-dpmsolver++  x_t = (sigma_t / sigma_s) e^{-h} x_s         - alpha_t   sum_k J_k(-2h) D_k + noise
    dpmsolver        x_t = (alpha_t / alpha_s) x_s                - sigma_t   sum_k J_k(h)   D_k
    sde-dpmsolver    x_t = (alpha_t / alpha_s) x_s                - 2 sigma_t sum_k J_k(h)   D_k + noise

The "++" variants integrate the data prediction x0, the others the noise prediction eps. In the noise-prediction
SDE only the score term of the reverse SDE doubles, which is why its weights are twice the ODE's. The
"midpoint" second-order solver replaces J_1 by J_0 / 2.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.randomness import randn_tensor
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule
from .schedule import VPMultistepMixin

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def exp_integrator_weights(z: torch.Tensor, count: int) -> list[torch.Tensor]:
    """[J_0(z), ..., J_{count-1}(z)] (count <= 3) for a 0-d float32 z, with J_k(z) = z phi_{k+1}(z).

    The closed forms J_0 = e^z - 1, J_1 = J_0 / z - 1 and J_2 = (J_0 - z) / z^2 - 1/2 are evaluated in float32
    as the reference evaluates them (exp, not expm1): for small h the higher weights lose digits, and matching
    that loss keeps the samples within float32 rounding of the reference's.
    """
    j0 = torch.exp(z) - 1.0
    return [j0, j0 / z - 1.0, (j0 - z) / z**2 - 0.5][:count]


class DPMSolverMultistepScheduler(VPMultistepMixin, SchedulerMixin):
    """Fast high-order solver for diffusion ODEs/SDEs; `dpmsolver++` with order 2 suits guided sampling."""

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
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
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
            raise ValueError(f"algorithm_type={algorithm_type!r} is not supported; choose one of {list(ALGORITHMS)}")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        elif solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type={solver_type!r} is not supported; choose one of {list(SOLVER_TYPES)}")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order!r} is not supported; DPM-Solver has orders 1, 2 and 3")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'")
        if not self._predicts_data and final_sigmas_type == "zero":
            # The noise prediction carries no information at sigma = 0: those variants must stop at sigma_min.
            raise ValueError(f"final_sigmas_type='zero' does not work with algorithm_type={algorithm_type!r}; "
                             "pass final_sigmas_type='sigma_min' or use 'dpmsolver++' / 'sde-dpmsolver++'")
        if not self._predicts_data and prediction_type == "flow_prediction":
            raise ValueError(f"prediction_type='flow_prediction' needs a data-prediction solver; use "
                             f"algorithm_type='dpmsolver++' or 'sde-dpmsolver++' instead of {algorithm_type!r}")
        self._build_noise_schedule(rescale_betas_zero_snr)

    @property
    def _predicts_data(self) -> bool:
        return self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")

    @property
    def _stochastic(self) -> bool:
        return self.config.algorithm_type.startswith("sde-")

    # -- schedule ------------------------------------------------------------------------------------------

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
            for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas",
                         "use_flow_sigmas"):
                if c[flag]:
                    raise ValueError(f"custom timesteps cannot be used with {flag}=True, which lays out its own "
                                     "schedule; pass num_inference_steps instead")
            schedule.check_custom_timesteps(timesteps, c.num_train_timesteps)
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            # Leave out the noisiest timesteps whose lambda is below lambda_min_clipped (for the cosine schedule).
            clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
            if clipped == c.num_train_timesteps:
                # diffusers lays out timestep -1 here and fails with IndexError during the run
                raise ValueError(f"lambda_min_clipped={c.lambda_min_clipped} is above log(alpha / sigma) of every "
                                 f"training step (at most {self.lambda_t[0].item():.3g}), so no timestep is left "
                                 "to sample; pass a smaller lambda_min_clipped (-5.1 suits the cosine schedule)")
            timesteps = schedule.multistep_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps,
                                                     c.steps_offset, last_timestep=c.num_train_timesteps - clipped)

        train_sigmas, log_sigmas = self._training_log_sigmas()
        n = num_inference_steps
        # The cosine schedule keeps the fractional timesteps of re-spaced sigmas (they are truncated to int64).
        round_t = np.round if c.beta_schedule != "squaredcos_cap_v2" else np.asarray
        # sigma_min / sigma_max are not DPM-Solver options, but a config converted from Euler may carry them
        bounds = dict(sigma_min=c.get("sigma_min"), sigma_max=c.get("sigma_max"))
        if c.use_karras_sigmas:
            sigmas = schedule.convert_sigmas(np.flip(train_sigmas), n, use_karras=True, **bounds)
            timesteps = round_t(schedule.sigma_to_t(sigmas, log_sigmas))
        elif c.use_lu_lambdas:
            # Lu et al.'s uniform-lambda steps: evenly spaced in log sigma from the top of training to its bottom.
            top, bottom = log_sigmas[-1].item(), log_sigmas[0].item()
            sigmas = np.exp(top + np.linspace(0, 1, n) * (bottom - top))
            timesteps = round_t(schedule.sigma_to_t(sigmas, log_sigmas))
        elif c.use_exponential_sigmas or c.use_beta_sigmas:
            sigmas = schedule.convert_sigmas(np.flip(train_sigmas), n, use_exponential=c.use_exponential_sigmas,
                                             use_beta=c.use_beta_sigmas, **bounds)
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
        elif c.use_flow_sigmas:
            sigmas = schedule.shifted_flow_sigmas(n, c.num_train_timesteps, shift)
            timesteps = sigmas * c.num_train_timesteps
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)

        final = train_sigmas[0].item() if c.final_sigmas_type == "sigma_min" else 0.0
        self._store_run_schedule(timesteps, np.concatenate([sigmas, [final]]), device)

    # -- stepping ------------------------------------------------------------------------------------------

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The quantity this variant integrates: the data prediction x0 (`++`) or the noise prediction eps."""
        model_output = self._mean_output(model_output, sample)
        if self._predicts_data:
            return self._data_prediction(model_output, sample)
        return self._noise_prediction(model_output, sample)

    def _step_order(self) -> int:
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        few_steps = c.lower_order_final and n < 15  # lower orders near the end steady short runs
        if i == n - 1 and (c.euler_at_final or few_steps or c.final_sigmas_type == "zero"):
            # Towards sigma = 0 (lambda = inf) a polynomial in lambda has no limit: only the first order is defined.
            cap = 1
        elif i == n - 2 and few_steps:
            cap = 2
        else:
            cap = 3
        # warm-up: an order-k step needs k stored outputs
        return min(c.solver_order, self.lower_order_nums + 1, cap)

    def _update(self, sample: torch.Tensor, order: int, noise: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        i = self._step_index
        alpha_t, sd_t = self._alpha_sigma(i + 1)
        alpha_s0, sd_s0 = self._alpha_sigma(i)
        lam = [self._lambda(i - k) for k in range(order)]  # s0 (current), s1, s2 (earlier)
        h = self._lambda(i + 1) - lam[0]
        if h == 0:
            # A zero-length step (a Karras ladder ending on sigma_min repeats it) leaves the sample as it is;
            # the divided differences below would divide by h.
            return sample
        if self._stochastic and h < 0:
            # The SDE's fresh noise has variance sigma_t^2 (1 - e^{-2h}): negative when the noise level rises.
            # diffusers returns NaN here; the only way to get such a step is the configuration named below.
            raise ValueError(f"algorithm_type={c.algorithm_type!r} cannot step from sigma {self.sigmas[i]:g} up "
                             f"to {self.sigmas[i + 1]:g}: the noise it adds would have negative variance. With "
                             "use_flow_sigmas=True, final_sigmas_type='sigma_min' ends above the last flow sigma; "
                             "pass final_sigmas_type='zero'")

        # Divided differences in lambda, each scaled by h: D1 ~ h m'(s0), D2 ~ h^2 m''(s0) / 2.
        m = self.model_outputs[::-1]  # newest first
        D = [m[0]]
        if order >= 2:
            r0 = (lam[0] - lam[1]) / h
            d0 = (1.0 / r0) * (m[0] - m[1])
            if order == 2:
                D.append(d0)
            else:
                r1 = (lam[1] - lam[2]) / h
                d1 = (1.0 / r1) * (m[1] - m[2])
                D.append(d0 + (r0 / (r0 + r1)) * (d0 - d1))
                D.append((1.0 / (r0 + r1)) * (d0 - d1))

        algo = c.algorithm_type
        if algo == "dpmsolver++":
            linear, scale, z = sd_t / sd_s0, -alpha_t, -h
        elif algo == "sde-dpmsolver++":
            linear, scale, z = sd_t / sd_s0 * torch.exp(-h), -alpha_t, -2.0 * h
        elif algo == "dpmsolver":
            linear, scale, z = alpha_t / alpha_s0, -sd_t, h
        else:
            linear, scale, z = alpha_t / alpha_s0, -2.0 * sd_t, h
        weights = [scale * j for j in exp_integrator_weights(z, order)]
        if order == 2 and c.solver_type == "midpoint":
            weights[1] = 0.5 * weights[0]

        x = linear * sample
        for w, d in zip(weights, D):
            x = x + w * d
        if algo == "sde-dpmsolver++":
            x = x + sd_t * torch.sqrt(1.0 - torch.exp(-2.0 * h)) * noise
        elif algo == "sde-dpmsolver":
            x = x + sd_t * torch.sqrt(torch.exp(2.0 * h) - 1.0) * noise
        return x

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """Advance ``sample`` one step; SDE variants draw their noise from ``generator`` or take ``variance_noise``."""
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps; "
                             "call set_timesteps(num_inference_steps) first")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        order = self._step_order()
        converted = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        noise = None
        if self._stochastic:
            if variance_noise is None:
                noise = randn_tensor(sample.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        # float32 arithmetic even for half-precision models: the step differences are small
        prev_sample = self._update(sample.to(torch.float32), order, noise).to(model_output.dtype)

        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
