"""UniPC (Zhao et al. 2023, arXiv:2302.04867): a multistep predictor (UniP) and corrector (UniC) of any order.

Both work in lambda = log(alpha / sigma), on the data prediction x0 (``predict_x0``) or the noise prediction.
With hh = -h for x0 and hh = h for eps (h = lambda_t - lambda_s0), one update reads

    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t J_0(hh) m0 - alpha_t B(hh) sum_k rho_k D_k        (x0; for eps
          alpha and sigma swap roles)

where D_k = (m_k - m0) / r_k are divided differences of earlier outputs at relative steps r_k, J_k(z) = z
phi_{k+1}(z), and B(hh) is hh ("bh1") or e^hh - 1 ("bh2"). The weights rho solve the order conditions
sum_k rho_k r_k^(j-1) = J_j(hh) j! / B(hh). The corrector re-runs the last update once the model output at
its end is known, adding that output as one more point (r = 1): one extra order of accuracy at no extra
model evaluation.

Stepping to sigma = 0 (the default final step) has h = inf. Only the first-order update has a limit there, the
data prediction itself; differences in lambda do not. diffusers still forms alpha_t * B(hh) * 0 for the empty
higher-order sum, which with bh1 (B = hh = -inf) is NaN, and with lower_order_final=False takes a higher
order into the infinite lambda step (inf or NaN for both bh1 and bh2). Here that step is first order and finite.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule
from .schedule import VPMultistepMixin

SOLVER_TYPES = ("bh1", "bh2")


class UniPCMultistepScheduler(VPMultistepMixin, SchedulerMixin):
    """Training-free predictor-corrector sampler; order 2 suits guided sampling, order 3 unconditional."""

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006  (diffusers' default, recorded in the config as is)
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        # Other multistep families' solver names, so their configs load here.
        if solver_type in ("midpoint", "heun", "logrho"):
            self.register_to_config(solver_type="bh2")
        elif solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type={solver_type!r} is not supported; choose one of {list(SOLVER_TYPES)}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={final_sigmas_type!r} is not supported; use 'zero' or 'sigma_min'")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal only applies to flow sigmas; set use_flow_sigmas=True or leave it None")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type={time_shift_type!r} is not supported; use 'exponential' or 'linear'")
        if not predict_x0 and prediction_type == "flow_prediction":
            raise ValueError("prediction_type='flow_prediction' needs predict_x0=True")
        # Any scheduler can stand in for UniP ("solver_p + UniC"); an attribute, so a per-call copy gets its own.
        self.solver_p = solver_p
        self._build_noise_schedule(rescale_betas_zero_snr)

    def _reset_run_state(self) -> None:
        super()._reset_run_state()
        self.last_sample = None  # the sample before the last predictor, for the corrector
        self.this_order = None  # the order of the last predictor

    # -- schedule ------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None):
        """Lay out the run. Custom descending ``sigmas`` (one per step, flow sigmas only) replace the step count;
        ``mu`` is the dynamic time shift, required with ``use_dynamic_shifting``."""
        c = self.config
        owner = type(self).__name__
        if c.use_dynamic_shifting and mu is None:
            raise ValueError(f"{owner}.set_timesteps needs mu= because the config sets use_dynamic_shifting=True")
        if sigmas is not None:
            if not c.use_flow_sigmas:
                raise ValueError(f"{owner}.set_timesteps takes custom sigmas= only with use_flow_sigmas=True")
            sigmas = np.array(sigmas, dtype=np.float64).reshape(-1)
            if len(sigmas) == 0 or np.any(np.diff(sigmas) > 0):
                raise ValueError("custom sigmas= must be a non-empty descending sequence, one per step")
            if num_inference_steps not in (None, len(sigmas)):
                raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with the {len(sigmas)} "
                                 "custom sigmas; leave num_inference_steps out")
            num_inference_steps = len(sigmas)
        elif num_inference_steps is None:
            raise ValueError(f"{owner}.set_timesteps needs num_inference_steps (or sigmas= with flow sigmas)")
        n, T = num_inference_steps, c.num_train_timesteps
        timesteps = schedule.multistep_timesteps(c.timestep_spacing, n, T, c.steps_offset)

        use_respacing = c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas
        if use_respacing:
            if sigmas is None:
                sigmas, log_sigmas = self._training_log_sigmas()
            else:
                log_sigmas = np.log(sigmas)
            sigmas = schedule.convert_sigmas(np.flip(sigmas), n, c.use_karras_sigmas, c.use_exponential_sigmas,
                                             c.use_beta_sigmas, sigma_min=c.sigma_min, sigma_max=c.sigma_max)
            if c.use_karras_sigmas and c.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)  # read the Karras ladder as noise-to-signal ratios of a flow
                timesteps = sigmas * T
            else:
                timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
                if c.use_karras_sigmas:
                    timesteps = np.round(timesteps)
            final = sigmas[-1]
        elif c.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / T, n + 1)[:-1]
            if c.use_dynamic_shifting:
                sigmas = self._time_shift(mu, sigmas)
            else:
                sigmas = c.flow_shift * sigmas / (1 + (c.flow_shift - 1) * sigmas)
            if c.shift_terminal:
                # stretch so the last sigma lands on shift_terminal (LTX-Video)
                if sigmas[-1] == 1:
                    raise ValueError("shift_terminal cannot stretch a schedule whose last sigma is 1 (a single "
                                     "step from pure noise); use more steps or leave shift_terminal None")
                scale = (1 - sigmas[-1]) / (1 - c.shift_terminal)
                sigmas = 1 - (1 - sigmas) / scale
            if abs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6  # keep alpha = 1 - sigma off zero
            timesteps = sigmas * T
            final = sigmas[-1]
        else:
            train_sigmas, _ = self._training_log_sigmas()
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
            final = train_sigmas[0].item()
        if c.final_sigmas_type == "zero":
            final = 0.0
        self._store_run_schedule(timesteps, np.concatenate([sigmas, [final]]), device)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def _time_shift(self, mu: float, t: np.ndarray) -> np.ndarray:
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        return mu / (mu + (1 / t - 1))

    # -- stepping ------------------------------------------------------------------------------------------

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The data prediction x0 (``predict_x0``) or the noise prediction eps.

        diffusers thresholds only the data prediction; with predict_x0=False, thresholding is ignored.
        """
        if self.config.predict_x0:
            return self._data_prediction(model_output, sample)
        return self._noise_prediction(model_output, sample, threshold=False)

    def _bh_update(self, x: torch.Tensor, s_indices: list[int], t_index: int, outputs: list[torch.Tensor],
                   this_output: torch.Tensor | None = None) -> torch.Tensor:
        """One UniP step (``this_output`` None) or UniC step from ladder[s_indices[0]] to ladder[t_index].

        ``s_indices`` and ``outputs`` run newest first; their length is the order p. The corrector also knows
        the model output at t, ``this_output``. Scalars are 0-d float32 tensors, combined in the reference's
        order (see VPMultistepMixin).
        """
        c = self.config
        order = len(outputs)
        alpha_t, sd_t = self._alpha_sigma(t_index)
        alpha_s0, sd_s0 = self._alpha_sigma(s_indices[0])
        lam_s0 = self._lambda(s_indices[0])
        h = self._lambda(t_index) - lam_s0
        if h == 0:
            return x  # a zero-length step (the repeated last sigma of a respaced ladder) moves nothing
        m0 = outputs[0]

        hh = -h if c.predict_x0 else h
        j0 = torch.expm1(hh)  # J_0(hh) = e^hh - 1
        if c.predict_x0:
            scale = alpha_t
            x_t = sd_t / sd_s0 * x - alpha_t * j0 * m0
        else:
            scale = sd_t
            # sigma_t (e^h - 1) tends to alpha_t sigma_s0 / alpha_s0 as sigma_t -> 0 (h -> inf)
            first = sd_t * j0 if sd_t > 0 else alpha_t * sd_s0 / alpha_s0
            x_t = alpha_t / alpha_s0 * x - first * m0

        if this_output is None and order == 1:
            return x_t.to(x.dtype)

        rks = [(self._lambda(s) - lam_s0) / h for s in s_indices[1:]]
        diffs = [(m - m0) / r for m, r in zip(outputs[1:], rks)]
        big_b = hh if c.solver_type == "bh1" else torch.expm1(hh)
        # Order conditions sum_k rho_k r_k^(j-1) = J_j(hh) j! / B(hh), j = 1..p, with the recursion
        # J_j = J_{j-1} / hh - 1 / j! (all float32).
        powers = torch.stack([torch.stack(rks + [torch.ones(())]) ** j for j in range(order)])
        rhs, j_k, factorial = [], j0 / hh - 1, 1
        for j in range(1, order + 1):
            rhs.append(j_k * factorial / big_b)
            factorial *= j + 1
            j_k = j_k / hh - 1 / factorial
        rhs = torch.stack(rhs)
        if this_output is None:
            # UniP-p uses the first p - 1 conditions; for p = 2 the paper fixes rho = 1/2 (exact as h -> 0)
            rhos = torch.full((1,), 0.5) if order == 2 else torch.linalg.solve(powers[:-1, :-1], rhs[:-1])
            rhos = rhos.to(device=x.device, dtype=x.dtype)
            residual = torch.einsum("k,bkc...->bc...", rhos, torch.stack(diffs, dim=1))
        else:
            rhos = torch.full((1,), 0.5) if order == 1 else torch.linalg.solve(powers, rhs)
            rhos = rhos.to(device=x.device, dtype=x.dtype)
            residual = rhos[-1] * (this_output - m0)
            if diffs:
                residual = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(diffs, dim=1)) + residual
        return (x_t - scale * big_b * residual).to(x.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Correct ``sample`` with the new model output (UniC), then predict the next one (UniP)."""
        c = self.config
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps; "
                             "call set_timesteps(num_inference_steps) first")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        i = self._step_index

        converted = self.convert_model_output(model_output, sample)
        if i > 0 and (i - 1) not in c.disable_corrector and self.last_sample is not None:
            # outputs that fed the last predictor, newest first, at the ladder points it started from
            p = self.this_order
            history = self.model_outputs[::-1][:p]
            sample = self._bh_update(self.last_sample, [i - 1 - k for k in range(p)], i, history, converted)

        self.model_outputs = self.model_outputs[1:] + [converted]
        order = c.solver_order
        if c.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        if self.sigmas[i + 1] == 0:
            order = 1  # see the module docstring: only the first order reaches sigma = 0
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: an order-p step needs p outputs
        self.last_sample = sample

        if self.solver_p is not None:
            prev_sample = self.solver_p.step(model_output, timestep, sample).prev_sample
        else:
            history = self.model_outputs[::-1][: self.this_order]
            prev_sample = self._bh_update(sample, [i - k for k in range(self.this_order)], i + 1, history)

        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
