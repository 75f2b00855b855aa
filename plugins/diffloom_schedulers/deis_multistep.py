"""DEIS (Zhang & Chen 2023, arXiv:2204.13902), the multistep exponential integrator in its "logrho" form.

Written in rho = sigma_t / alpha_t, the probability-flow ODE becomes d(x / alpha) = eps(rho) d rho, so

    x_t / alpha_t = x_s / alpha_s + integral from rho_s to rho_t of eps(rho) d rho.

DEIS fits the last p noise predictions with a Lagrange polynomial in log rho and integrates it exactly: with
u = log rho, the integral of e^u q(u) du for a polynomial q is e^u (q - q' + q'' - ...).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffloom.configuration import register_to_config
from diffloom.scheduling import SchedulerMixin, SchedulerOutput

from . import schedule
from .schedule import VPMultistepMixin


def lagrange_log_integrals(nodes: list[float], lower: float, upper: float) -> list[float]:
    """Integral over rho from e^lower to e^upper of each Lagrange basis polynomial on ``nodes`` in u = log rho."""
    weights = []
    for j, node in enumerate(nodes):
        others = nodes[:j] + nodes[j + 1:]
        basis = np.poly1d(others, r=True) / math.prod(node - u for u in others)
        antiderivative = sum((-1) ** k * basis.deriv(k) for k in range(len(nodes)))  # times e^u
        weights.append(math.exp(upper) * antiderivative(upper) - math.exp(lower) * antiderivative(lower))
    return weights


def linear_log_weights(rho_t: np.float32, rho_s0: np.float32, rho_s1: np.float32) -> list[np.float32]:
    """The second-order weights of lagrange_log_integrals in closed form, evaluated in float32 as the reference
    does: the basis (u - c) / (b - c) in u = log rho integrates against d rho to rho (u - c - 1) / (b - c).

    In float32 the two antiderivative values nearly cancel; matching the reference's evaluation keeps the
    samples within float32 rounding of its own.
    """
    u_t, u_s0, u_s1 = np.log(rho_t), np.log(rho_s0), np.log(rho_s1)

    def weight(b, c):  # basis polynomial that is 1 at node b and 0 at node c
        return rho_t * (u_t - c - 1) / (b - c) - rho_s0 * (u_s0 - c - 1) / (b - c)

    return [weight(u_s0, u_s1), weight(u_s1, u_s0)]


class DEISMultistepScheduler(VPMultistepMixin, SchedulerMixin):
    """Diffusion exponential integrator sampler; order 2 or 3 needs few steps."""

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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        # Other multistep families' names for these settings, so their configs load here.
        if algorithm_type in ("dpmsolver", "dpmsolver++"):
            self.register_to_config(algorithm_type="deis")
        elif algorithm_type != "deis":
            raise ValueError(f"algorithm_type={algorithm_type!r} is not supported; DEIS has only 'deis'")
        if solver_type in ("midpoint", "heun", "bh1", "bh2"):
            self.register_to_config(solver_type="logrho")
        elif solver_type != "logrho":
            raise ValueError(f"solver_type={solver_type!r} is not supported; DEIS has only 'logrho'")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={solver_order!r} is not supported; DEIS has orders 1, 2 and 3")
        self._build_noise_schedule()

    # -- schedule ------------------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device=None, mu: float | None = None):
        """Lay out the run; ``mu`` (with ``use_dynamic_shifting``) sets the flow shift to exp(mu) for this run."""
        c = self.config
        shift = c.flow_shift
        if mu is not None:
            if not (c.use_dynamic_shifting and c.time_shift_type == "exponential"):
                raise ValueError(f"{type(self).__name__}.set_timesteps got mu={mu}, which needs "
                                 "use_dynamic_shifting=True and time_shift_type='exponential' in the config")
            shift = math.exp(mu)
        n = num_inference_steps
        timesteps = schedule.multistep_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        train_sigmas, log_sigmas = self._training_log_sigmas()
        if c.use_karras_sigmas or c.use_exponential_sigmas or c.use_beta_sigmas:
            # sigma_min / sigma_max are not DEIS options, but a config converted from Euler may carry them
            sigmas = schedule.convert_sigmas(np.flip(train_sigmas), n, c.use_karras_sigmas,
                                             c.use_exponential_sigmas, c.use_beta_sigmas,
                                             sigma_min=c.get("sigma_min"), sigma_max=c.get("sigma_max"))
            timesteps = schedule.sigma_to_t(sigmas, log_sigmas)
            if c.use_karras_sigmas:
                timesteps = np.round(timesteps)
            final = sigmas[-1]  # the last step then stays put
        elif c.use_flow_sigmas:
            sigmas = schedule.shifted_flow_sigmas(n, c.num_train_timesteps, shift)
            timesteps = sigmas * c.num_train_timesteps
            final = sigmas[-1]
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
            final = train_sigmas[0].item()
        self._store_run_schedule(timesteps, np.concatenate([sigmas, [final]]), device)

    # -- stepping ------------------------------------------------------------------------------------------

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The noise prediction eps, taken through x0 so thresholding and every prediction type apply."""
        alpha_t, sigma_t = self._alpha_sigma(self._step_index)
        return (sample - alpha_t * self._data_prediction(model_output, sample)) / sigma_t

    def _rho(self, index: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(index)
        return sigma / alpha

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Advance ``sample`` one step with the order-p DEIS update."""
        c = self.config
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}.step called before set_timesteps; "
                             "call set_timesteps(num_inference_steps) first")
        if self._step_index is None:
            self._init_step_index(timestep)
        self._check_not_finished()
        i, n = self._step_index, len(self.timesteps)
        few_steps = c.lower_order_final and n < 15  # lower orders near the end steady short runs
        cap = 1 if (i == n - 1 and few_steps) else 2 if (i == n - 2 and few_steps) else 3
        order = min(c.solver_order, self.lower_order_nums + 1, cap)

        self.model_outputs = self.model_outputs[1:] + [self.convert_model_output(model_output, sample)]
        outputs = self.model_outputs[::-1][:order]  # newest first
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        alpha_s, sigma_s = self._alpha_sigma(i)
        if order == 1:
            # A constant eps integrates to alpha_t (rho_t - rho_s) eps = -sigma_t (e^h - 1) eps, h the lambda step:
            # DDIM. Written with e^h, as the reference writes it.
            h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
            prev_sample = (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * outputs[0]
        else:
            if order == 2:
                rho = [self._rho(k).numpy() for k in (i + 1, i, i - 1)]
                weights = [torch.from_numpy(np.asarray(w)) for w in linear_log_weights(*rho)]
            else:
                # Third order stays in float64: the reference's float32 closed form loses ~1e-4 to cancellation.
                nodes = [math.log(self._rho(i - k).item()) for k in range(order)]
                weights = [torch.tensor(w, dtype=torch.float32)
                           for w in lagrange_log_integrals(nodes, nodes[0], math.log(self._rho(i + 1).item()))]
            # x_t = alpha_t (x_s / alpha_s + sum_j w_j eps_j)
            inner = sample / alpha_s
            for w, eps in zip(weights, outputs):
                inner = inner + w * eps
            prev_sample = alpha_t * inner

        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
