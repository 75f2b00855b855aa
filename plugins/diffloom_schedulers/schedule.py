"""Pieces every discrete-time scheduler shares: the beta schedule, the inference timesteps, the sigma ladders.

The arithmetic follows the reference implementation step for step (float32 betas built in torch, timestep
grids and sigma ladders built in NumPy float64), because a different order of rounding would move the
timesteps a pipeline sees and with them every image.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffloom.randomness import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# The schedulers that can take each other's configs (diffusers' KarrasDiffusionSchedulers, in its order).
KARRAS_COMPATIBLES = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
)
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


# -- training noise schedule ---------------------------------------------------------------------------------

def _alpha_bar(kind: str):
    """alpha_bar(t) for t in [0, 1]: the fraction of signal left after a fraction t of the forward process."""
    if kind == "cosine":  # Nichol & Dhariwal's cosine schedule, offset s = 0.008
        return lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(-12.0 * t)
    if kind == "laplace":  # log-SNR follows a Laplace distribution centred at t = 0.5
        def laplace(t):
            log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6)
            snr = math.exp(log_snr)
            return math.sqrt(snr / (1 + snr))
        return laplace
    raise ValueError(f"unknown alpha_bar kind {kind!r}; use 'cosine', 'exp' or 'laplace'")


def betas_for_alpha_bar(num_train_timesteps: int, kind: str = "cosine", max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose cumulative product of (1 - beta) follows alpha_bar at the grid points i / T."""
    alpha_bar = _alpha_bar(kind)
    grid = [i / num_train_timesteps for i in range(num_train_timesteps + 1)]
    betas = [min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta) for t1, t2 in zip(grid[:-1], grid[1:])]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas=None, allowed: tuple[str, ...] = BETA_SCHEDULES) -> torch.Tensor:
    """The float32 training betas of a scheduler config; ``allowed`` lists the schedules its class takes."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule not in allowed:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported here; choose one of {list(allowed)} "
                         "or pass trained_betas")
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, "cosine")
    if beta_schedule == "exp":
        return betas_for_alpha_bar(n, "exp")
    if beta_schedule == "laplace":
        return betas_for_alpha_bar(n, "laplace")
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule={beta_schedule!r} has no implementation")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step is pure noise (Lin et al. 2023, algorithm 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))  # keeps the first value, sends the last to zero
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """Noise-to-signal ratio sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) as a float32 array, t ascending."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy().copy()


# -- inference timesteps -------------------------------------------------------------------------------------

def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0,
                     integer: bool = True) -> np.ndarray:
    """Descending inference timesteps (table 2 of "Common Diffusion Noise Schedules and Sample Steps are Flawed").

    ``integer=True`` gives rounded int64 timesteps; ``integer=False`` keeps linspace's fractional values as
    float32, as the sigma schedulers do.
    """
    if num_inference_steps is None or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps={num_inference_steps} is larger than num_train_timesteps="
                         f"{num_train_timesteps}: the model only knows {num_train_timesteps} noise levels")
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n)[::-1]
        return timesteps.round().astype(np.int64) if integer else timesteps.astype(np.float32)
    if spacing == "leading":
        timesteps = np.arange(0, n)[::-1] * (T // n) + steps_offset
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {list(TIMESTEP_SPACINGS)}")
    return timesteps.astype(np.int64 if integer else np.float32)


def check_timestep_fits(timestep, config, owner: str) -> None:
    """Schedulers that index alpha_bar by timestep need it below num_train_timesteps; "leading" spacing plus
    steps_offset can put the first timestep past that (diffusers then fails with IndexError). Checked in step, not
    set_timesteps: an img2img run that starts lower never reaches it, in diffusers as here."""
    T = config.num_train_timesteps
    if timestep >= T:
        raise ValueError(f"{owner}: timestep {int(timestep)} is past the last training step {T - 1} (steps_offset="
                         f"{config.steps_offset} with timestep_spacing={config.timestep_spacing!r} puts the first "
                         "timesteps there); lower steps_offset or num_inference_steps, or use "
                         "timestep_spacing='trailing'")


def check_schedule_args(owner: str, num_inference_steps=None, timesteps=None, sigmas=None,
                        takes_timesteps: bool = False, takes_sigmas: bool = False) -> None:
    """Refuse impossible combinations of set_timesteps arguments before any state changes."""
    if timesteps is not None and sigmas is not None:
        raise ValueError(f"{owner}.set_timesteps got both timesteps= and sigmas=; pass only one of them")
    if timesteps is not None and not takes_timesteps:
        raise ValueError(f"{owner} does not take custom timesteps=; pass num_inference_steps instead")
    if sigmas is not None and not takes_sigmas:
        raise ValueError(f"{owner} does not take custom sigmas=; pass num_inference_steps instead")
    if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
        raise ValueError(f"{owner}.set_timesteps got num_inference_steps together with a custom schedule; "
                         "leave num_inference_steps out when passing timesteps= or sigmas=")
    if num_inference_steps is None and timesteps is None and sigmas is None:
        raise ValueError(f"{owner}.set_timesteps needs num_inference_steps (or a custom schedule)")


def check_custom_timesteps(timesteps, num_train_timesteps: int) -> None:
    """Custom timesteps must run strictly downwards and stay inside the training range."""
    values = [float(t) for t in timesteps]
    if not values:
        raise ValueError("timesteps= is empty; pass at least one timestep")
    for i in range(1, len(values)):
        if values[i] >= values[i - 1]:
            raise ValueError(f"custom timesteps must be strictly descending, but timesteps[{i}]={values[i]:g} "
                             f"follows timesteps[{i - 1}]={values[i - 1]:g}")
    if values[0] >= num_train_timesteps or values[-1] < 0:
        raise ValueError(f"custom timesteps must lie in [0, {num_train_timesteps}) (num_train_timesteps), "
                         f"got {values[0]:g} .. {values[-1]:g}")


def check_custom_sigmas(sigmas) -> None:
    """Custom sigmas: at least two values (the last one is where sampling ends), never negative or rising."""
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("sigmas= needs at least two values: the noise levels to visit plus the final one")
    if min(values) < 0:
        raise ValueError("sigmas= holds a negative value; noise levels are >= 0")
    for i in range(1, len(values)):
        if values[i] > values[i - 1]:
            raise ValueError(f"custom sigmas must be descending, but sigmas[{i}]={values[i]:g} "
                             f"follows sigmas[{i - 1}]={values[i - 1]:g}")


# -- sigma ladders -------------------------------------------------------------------------------------------

def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution ("Beta Sampling is All You Need", 2024)."""
    quantiles = [beta_ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def _incomplete_beta_cf(x: float, a: float, b: float) -> float:
    """Continued fraction for I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        # two partial numerators per m: the even term d_{2m} and the odd term d_{2m+1}
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - _log_beta(a, b)
    return math.exp(log_front) * result


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b): the Beta(a, b) distribution function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x < (a + 1) / (a + b + 2):
        return _incomplete_beta_cf(x, a, b)
    return 1.0 - _incomplete_beta_cf(1.0 - x, b, a)  # symmetry I_x(a, b) = 1 - I_{1-x}(b, a)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the Beta(a, b) distribution function, by bisection down to float64 resolution."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return mid
        if regularized_incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid


def convert_sigmas(in_sigmas: np.ndarray, n: int, use_karras: bool = False, use_exponential: bool = False,
                   use_beta: bool = False, sigma_min: float | None = None, sigma_max: float | None = None):
    """Re-space a descending sigma ladder between its ends (or the given bounds); None when no option is on."""
    if sum(map(bool, (use_karras, use_exponential, use_beta))) > 1:
        raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be True")
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    if use_karras:
        return karras_sigmas(lo, hi, n)
    if use_exponential:
        return exponential_sigmas(lo, hi, n)
    if use_beta:
        return beta_sigmas(lo, hi, n)
    return None


def respace_sigmas(sigmas: np.ndarray, log_sigmas: np.ndarray, n: int, config,
                   sigma_min: float | None = None, sigma_max: float | None = None):
    """Apply the config's karras/exponential/beta option: (new sigmas, their fractional timesteps).

    Returns None when no option is on, so the caller keeps its own grid.
    """
    respaced = convert_sigmas(sigmas, n, config.get("use_karras_sigmas"), config.get("use_exponential_sigmas"),
                              config.get("use_beta_sigmas"), sigma_min, sigma_max)
    if respaced is None:
        return None
    return respaced, sigma_to_t(respaced, log_sigmas)


def check_one_sigma_option(config) -> None:
    """At most one of the sigma re-spacing options may be on."""
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if len(flags) > 1:
        raise ValueError(f"{' and '.join(flags)} are all True; only one of use_karras_sigmas, "
                         "use_exponential_sigmas and use_beta_sigmas can be used")


def sigma_to_t(sigmas, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the given sigmas, interpolating linearly in log sigma.

    ``log_sigmas`` is the log of the training sigmas, t ascending; values outside the range clamp to its ends.
    The lower neighbour is the last training step whose log sigma does not exceed the value: zero terminal SNR
    makes the ladder dip just before its top (alpha_bar[-1] is raised to 2^-24), where a bisection would pick
    a different interval than diffusers.
    """
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    not_above = log_sigmas[None, :] <= log_sigma.reshape(-1, 1)
    last = len(log_sigmas) - 1 - np.argmax(not_above[:, ::-1], axis=1)
    low = np.clip(np.where(not_above.any(axis=1), last, 0), 0, len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


# -- prediction post-processing ------------------------------------------------------------------------------

def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: clip x0 to its ``ratio`` quantile s (1 <= s <= max_value), divide by s."""
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    flat = sample.reshape(batch, channels * int(np.prod(rest)))
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # quantile needs full precision
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    flat = torch.clamp(flat, -s, s) / s
    return flat.reshape(batch, channels, *rest).to(dtype)


def predict_x0(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
               alpha_prod_t: torch.Tensor, owner: str) -> torch.Tensor:
    """The clean sample implied by the model output, with x_t = sqrt(a) x0 + sqrt(1 - a) eps and a = alpha_bar_t."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t**0.5
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
        return alpha_prod_t**0.5 * sample - (1 - alpha_prod_t) ** 0.5 * model_output
    raise ValueError(f"{owner}: prediction_type={prediction_type!r} is not supported; "
                     "use 'epsilon', 'sample' or 'v_prediction'")


def sigma_predict_x0(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, sigma,
                     owner: str) -> torch.Tensor:
    """x0 from the model output for x = x0 + sigma * eps, the denoiser having seen x / sqrt(sigma^2 + 1)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"{owner}: prediction_type={prediction_type!r} is not supported; "
                     "use 'epsilon', 'v_prediction' or 'sample'")


def check_float_timestep(timestep, owner: str) -> None:
    """Sigma schedulers look timesteps up by value; a loop index from enumerate() would pick a wrong sigma."""
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError(f"{owner} got an integer timestep ({timestep!r}); pass values from scheduler.timesteps, "
                         "not loop indices")


def clip_x0(x0: torch.Tensor, config) -> torch.Tensor:
    """Dynamic thresholding if the config asks for it, else plain clipping if that is on."""
    if config.thresholding:
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if config.clip_sample:
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


def vp_add_noise(alphas_cumprod: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0) of a variance-preserving schedule at integer training timesteps."""
    alpha_bar = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    alpha_bar = alpha_bar[timesteps.to(original_samples.device)]
    return (broadcast_to(alpha_bar**0.5, original_samples) * original_samples
            + broadcast_to((1 - alpha_bar) ** 0.5, original_samples) * noise)


def vp_velocity(alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    alpha_bar = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[timesteps.to(sample.device)]
    return broadcast_to(alpha_bar**0.5, sample) * noise - broadcast_to((1 - alpha_bar) ** 0.5, sample) * sample


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Flatten per-item values and append singleton dims so they broadcast over ``like``."""
    values = values.flatten()
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1))) if like.ndim > 1 else values


# -- step bookkeeping for sigma schedulers -------------------------------------------------------------------

class StepIndexMixin:
    """``step_index`` / ``begin_index`` for schedulers that advance one entry of ``self.timesteps`` per step.

    The step index starts where the first timestep passed in sits in ``self.timesteps`` (img2img starts
    part-way down), unless a pipeline fixed it with ``set_begin_index``.
    """

    _step_index = None
    _begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep``; when it appears twice (second-order schedules), the second one.

        Taking the second keeps an img2img run that starts mid-schedule from skipping a sigma.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep):g} is not one of this scheduler's timesteps; "
                             "pass a value from scheduler.timesteps")
        return matches[1 if len(matches) > 1 else 0].item()

    def _check_not_finished(self) -> None:
        """Refuse a step past the last timestep (diffusers fails there with an IndexError)."""
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"step() was called after the last of the {len(self.timesteps)} timesteps; call set_timesteps to "
                "start a new run. (An img2img run that starts on a repeated timestep also ends up here: call "
                "set_begin_index with the start position, as the pipelines do.)")

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index


class SigmaLadderMixin(StepIndexMixin):
    """Input scaling, starting noise and forward noising for schedulers that sample x = x0 + sigma * eps.

    Expects ``self.sigmas`` (descending, one more than the steps) and ``self.timesteps``.
    """

    is_scale_input_called = False

    @property
    def init_noise_sigma(self):
        top = self.sigmas.max()
        # linspace and trailing grids start at the last training step from pure noise sigma_max * eps; the
        # leading grid keeps the older convention sqrt(sigma_max^2 + 1), the spread of x0 + sigma * eps.
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return top
        return (top**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Divide by sqrt(sigma^2 + 1) so the denoiser sees the unit-variance input it was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        grid = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        if original_samples.device.type == "mps" and torch.is_floating_point(timesteps):
            grid, timesteps = grid.to(torch.float32), timesteps.to(torch.float32)  # mps has no float64
        if self._begin_index is None:
            indices = [self.index_for_timestep(t, grid) for t in timesteps]
        else:
            # img2img: the pipeline fixed where sampling begins (or it is already under way)
            start = self._step_index if self._step_index is not None else self._begin_index
            indices = [start] * timesteps.shape[0]
        return original_samples + noise * broadcast_to(sigmas[indices], original_samples)


# -- multistep exponential integrators (DPM-Solver, UniPC, DEIS) ---------------------------------------------
#
# These solvers work in lambda = log(alpha_t / sigma_t), half the log signal-to-noise ratio. There the linear
# part of the probability-flow ODE is solved exactly and only the network's prediction, as a function of
# lambda, is approximated by a polynomial through the last few model outputs.

def multistep_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int = 0,
                        last_timestep: int | None = None) -> np.ndarray:
    """Descending int64 timesteps of the multistep solvers.

    They lay n + 1 points over [0, last_timestep) and drop the lowest, so even the last step has a lower noise
    level left to move to. ``last_timestep`` (default: all of training) cuts off steps whose lambda is too small.
    """
    n, T = num_inference_steps, num_train_timesteps
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {n!r}")
    if n > T:
        raise ValueError(f"num_inference_steps={n} is larger than num_train_timesteps={T}: "
                         f"the model only knows {T} noise levels")
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return np.arange(n, 0, -1) * (last // (n + 1)) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {list(TIMESTEP_SPACINGS)}")


def shifted_flow_sigmas(num_inference_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """Descending flow-matching sigmas t' = shift t / (1 + (shift - 1) t), from 1 - 1/T, without the final zero."""
    t = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    return np.flip(shift * t / (1 + (shift - 1) * t))[:-1].copy()


class VPMultistepMixin(StepIndexMixin):
    """What DPM-Solver, UniPC and DEIS share: the training noise schedule, turning a model output into a data
    or noise prediction, and forward noising.

    ``self.sigmas`` holds the noise-to-signal ratios sigma / alpha of the visited levels (one more than the
    steps). A variance-preserving latent is x = alpha (x0 + sigma eps) with alpha = 1 / sqrt(sigma^2 + 1);
    with ``use_flow_sigmas`` the sigmas are flow-matching times instead and x = (1 - sigma) x0 + sigma eps.
    """

    def _build_noise_schedule(self, rescale_betas_zero_snr: bool = False) -> None:
        c = self.config
        if c.solver_order < 1:
            raise ValueError(f"solver_order must be at least 1, got {c.solver_order}")
        if c.prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(f"prediction_type={c.prediction_type!r} is not supported; use 'epsilon', 'sample', "
                             "'v_prediction' or 'flow_prediction'")
        check_one_sigma_option(c)
        self.betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            # zero terminal SNR would put the first sigma at infinity; the smallest fp16 subnormal keeps it finite
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = torch.from_numpy(sigmas_from_alphas_cumprod(self.alphas_cumprod))
        self.init_noise_sigma = 1.0
        # Until set_timesteps runs, the schedule is every training step.
        self.num_inference_steps = None
        T = c.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        """Start a fresh run. Everything per-run is rebound, never mutated, so copies of a scheduler stay apart."""
        self.model_outputs = [None] * self.config.solver_order
        self._levels = {}
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def _store_run_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        # sigmas stay on the CPU: the solvers take 0-d scalars from them, with no device round trip per step
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        self.timesteps = torch.from_numpy(np.asarray(timesteps)).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self._reset_run_state()

    def _training_log_sigmas(self) -> tuple[np.ndarray, np.ndarray]:
        sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        return sigmas, np.log(sigmas)

    # -- noise levels as float32 scalars -------------------------------------------------------------------
    #
    # The solvers' coefficients are 0-d float32 tensors, computed from the float32 ladder in the same order as
    # the reference. At high noise an update cancels almost completely (x0 = (x - sigma_t eps) / alpha_t), so
    # every float32 rounding shows; and a 0-d tensor multiplies a half-precision latent in half precision,
    # which a Python float would not.

    def _alpha_sigma(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of the latent x = alpha_t x0 + sigma_t eps at ladder entry ``index``."""
        return self._level(index)[:2]

    def _lambda(self, index: int) -> torch.Tensor:
        """Half log-SNR log(alpha_t / sigma_t) at ladder entry ``index``; +inf at sigma = 0."""
        return self._level(index)[2]

    def _level(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, lambda_t) at ladder entry ``index``, computed once per run (a step reads each
        entry up to four times)."""
        if index not in self._levels:
            s = self.sigmas[index]
            if self.config.use_flow_sigmas:
                alpha, sigma = 1 - s, s
            else:
                alpha = 1 / (s**2 + 1) ** 0.5
                sigma = s * alpha
            self._levels = {**self._levels, index: (alpha, sigma, torch.log(alpha) - torch.log(sigma))}
        return self._levels[index]

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the run; of a repeated value, the second occurrence unless the first
        opens the schedule.

        A multistep run visits each entry once, and truncated fractional timesteps can repeat (a Karras ladder
        on the cosine schedule starts [998, 998, ...], flow sigmas over few training steps repeat anywhere).
        Like diffusers we take the second occurrence, which is right for img2img started just after a repeat;
        but a fresh run must begin at entry 0, or it steps past its end (diffusers raises IndexError there).
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        matches = (schedule_timesteps == timestep).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep):g} is not one of this scheduler's timesteps; "
                             "pass a value from scheduler.timesteps")
        if len(matches) == 1 or matches[0].item() == 0:
            return matches[0].item()
        return matches[1].item()

    # -- what the network predicted ------------------------------------------------------------------------

    def _mean_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Drop the variance channels of a model trained with a learned variance (the mean comes first)."""
        if self.config.variance_type in ("learned", "learned_range"):
            return model_output[:, : sample.shape[1]]
        return model_output

    def _data_prediction(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """x0 implied by the model output at the current step, thresholded if the config asks."""
        c = self.config
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._alpha_sigma(self._step_index)
        if c.prediction_type == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif c.prediction_type == "sample":
            x0 = model_output
        elif c.prediction_type == "v_prediction":  # v = alpha eps - sigma x0
            x0 = alpha_t * sample - sigma_t * model_output
        else:  # flow_prediction: the velocity eps - x0 of x = (1 - sigma) x0 + sigma eps
            x0 = sample - sigma * model_output
        if c.thresholding:
            x0 = threshold_sample(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return x0

    def _noise_prediction(self, model_output: torch.Tensor, sample: torch.Tensor,
                          threshold: bool = True) -> torch.Tensor:
        """eps implied by the model output at the current step; thresholding (if on and ``threshold``) clips the
        x0 it implies."""
        c = self.config
        alpha_t, sigma_t = self._alpha_sigma(self._step_index)
        if c.prediction_type == "epsilon":
            eps = model_output
        elif c.prediction_type == "sample":
            eps = (sample - alpha_t * model_output) / sigma_t
        elif c.prediction_type == "v_prediction":
            eps = alpha_t * model_output + sigma_t * sample
        else:
            raise ValueError(f"prediction_type={c.prediction_type!r} needs a data-prediction solver; "
                             f"{type(self).__name__} is set up to integrate the noise prediction")
        if c.thresholding and threshold:
            x0 = threshold_sample((sample - sigma_t * eps) / alpha_t, c.dynamic_thresholding_ratio, c.sample_max_value)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    # -- the public odds and ends --------------------------------------------------------------------------

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """These solvers feed the latent to the model as it is."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        device, dtype = original_samples.device, original_samples.dtype
        timesteps = timesteps.to(device)
        if self.num_inference_steps is None:
            # No run is set up: noise at the training timesteps themselves.
            indices = timesteps.long().cpu()
        elif self._begin_index is None:
            schedule = self.timesteps.to(device)
            if device.type == "mps" and torch.is_floating_point(timesteps):
                schedule, timesteps = schedule.to(torch.float32), timesteps.to(torch.float32)  # mps has no float64
            indices = [self.index_for_timestep(t, schedule) for t in timesteps]
        else:
            # img2img starts where the pipeline fixed the start; inpainting re-noises at the current step
            start = self._step_index if self._step_index is not None else self._begin_index
            indices = [start] * timesteps.shape[0]
        sigma = broadcast_to(self.sigmas[indices].to(device=device, dtype=dtype), original_samples)
        if self.config.use_flow_sigmas:
            alpha_t, sigma_t = 1 - sigma, sigma
        else:
            alpha_t = 1 / (sigma**2 + 1) ** 0.5
            sigma_t = sigma * alpha_t
        return alpha_t * original_samples + sigma_t * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def churn(sample, model_output, sigma, num_sigmas: int, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float, generator):
    """Karras et al.'s stochastic churn: inside [s_tmin, s_tmax], raise the noise level by a factor (1 + gamma)
    with fresh noise before the Euler step. Returns the sample and the raised sigma."""
    gamma = min(s_churn / (num_sigmas - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return sample, sigma_hat
