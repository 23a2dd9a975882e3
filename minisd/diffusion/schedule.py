"""Noise schedules, the forward (noising) process, prediction conversions and the training target.

The discrete diffusion of DDPM / Stable Diffusion, t = 0 .. T-1 (T = num_train_timesteps, 1000 for SD):

    beta_t         noise added at step t                      (T,)  betas
    alpha_t        1 - beta_t
    abar_t         prod_{s<=t} alpha_s                        (T,)  alphas_cumprod ("alpha bar")
    x_t            sqrt(abar_t) x0 + sqrt(1 - abar_t) eps     q_sample, closed form (DDPM eq. 4)
    sigma_t        sqrt((1 - abar_t) / abar_t)                (T,)  the k-diffusion / "VE" noise level:
                   x_t / sqrt(abar_t) = x0 + sigma_t eps, which is what Euler / DPM++ integrate
    SNR(t)         abar_t / (1 - abar_t) = 1 / sigma_t^2

A network can be trained to predict one of three equivalent things (`prediction_type`):
    epsilon        eps                                        (DDPM, SD 1.x, SD 2.x base)
    v_prediction   v = sqrt(abar) eps - sqrt(1 - abar) x0     (Salimans & Ho 2022 §4; SD 2.x 768-v)
    sample         x0
and given x_t any one determines the other two (x0_from_prediction / eps_from_prediction below).

Shapes: N = batch, then any sample shape (C, H, W for images/latents). Timesteps t are an int (one
noise level for the whole batch) or an int array (N,) (one per batch element, as in training).

Precision: betas are returned in float32 like diffusers (float64 on request, like LDM, which builds the
schedule in float64 and stores float32 buffers). alphas_cumprod is always accumulated in float64 and rounded
once: a float32 running product drifts (about 1e-6 relative by t=999), and PyTorch's CPU cumprod also
accumulates in double, so this reproduces diffusers' float32 table to the last bit wherever the betas agree.

References (pinned):
  DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239 (eq. 4 q_sample, eq. 14 L_simple)
  Improved DDPM (cosine schedule), Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672 (eq. 17)
  Progressive distillation (v), Salimans & Ho 2022, https://arxiv.org/abs/2202.00512 (§4, appendix D)
  Common schedules are flawed (spacings), Lin et al. 2023, https://arxiv.org/abs/2305.08891 (Table 2)
  Karras et al. 2022 (sigma spacing, rho=7), https://arxiv.org/abs/2206.00364 (eq. 5)
  diffusers @ 58eb52c0: src/diffusers/schedulers/scheduling_ddpm.py (betas, add_noise, get_velocity),
    scheduling_euler_discrete.py (_sigma_to_t, _convert_to_karras)
    https://github.com/huggingface/diffusers/tree/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers
  CompVis LDM @ 21f890f9: ldm/modules/diffusionmodules/util.py make_beta_schedule
    https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/diffusionmodules/util.py
"""
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..backend import to_numpy, xp_of

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


# ----------------------------------------------------------------------------------------------------------------
# configuration

@dataclass(frozen=True)
class SchedulerConfig:
    """Every setting of the schedule and the samplers, with diffusers' scheduler_config.json field names.

    One config serves all samplers (each reads the fields it needs). Defaults are those of diffusers'
    DDPMScheduler/DDIMScheduler; note that diffusers' Euler and DPM-Solver classes default to
    timestep_spacing="linspace" instead, so always build from a full config (e.g. SD15_SCHEDULER).
    """
    num_train_timesteps: int = 1000  # e.g. 1000 (T, the number of training noise levels)
    beta_start: float = 0.0001  # e.g. 0.00085 for SD
    beta_end: float = 0.02  # e.g. 0.012 for SD
    beta_schedule: str = "linear"  # e.g. "scaled_linear" (SD) | "linear" (DDPM) | "squaredcos_cap_v2" (iDDPM)
    trained_betas: Optional[Tuple[float, ...]] = None  # e.g. None; explicit betas (T values) override the above
    prediction_type: str = "epsilon"  # e.g. "epsilon" (SD 1.x) | "v_prediction" (SD 2.x-v) | "sample"
    timestep_spacing: str = "leading"  # e.g. "leading" (SD) | "trailing" | "linspace": which t the steps visit
    steps_offset: int = 0  # e.g. 1 for SD: added to "leading" timesteps (981 ... 1 instead of 980 ... 0)
    set_alpha_to_one: bool = True  # e.g. False for SD: DDIM/PNDM use abar=1 (True) or abar_0 after the last step
    clip_sample: bool = True  # e.g. False for SD: DDPM/DDIM clip the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0  # e.g. 1.0
    skip_prk_steps: bool = False  # e.g. True for SD: PNDM runs PLMS only (no Runge-Kutta warm-up)
    variance_type: str = "fixed_small"  # e.g. "fixed_small" (posterior variance) | "fixed_large" (beta_t): DDPM
    use_karras_sigmas: bool = False  # e.g. True for "DPM++ 2M Karras": Euler/Euler a/LMS/DPM++ sigma spacing
    sigma_min: Optional[float] = None  # e.g. None: Karras range, None = taken from the schedule
    sigma_max: Optional[float] = None  # e.g. None
    final_sigmas_type: str = "zero"  # e.g. "zero": Euler/DPM++ end at sigma 0 | "sigma_min": end at sigma_0
    solver_order: int = 2  # e.g. 2: DPM-Solver++ multistep order (1 or 2)
    algorithm_type: str = "dpmsolver++"  # e.g. "dpmsolver++" (the only one implemented)
    solver_type: str = "midpoint"  # e.g. "midpoint" (k-diffusion's DPM++ 2M) | "heun"
    lower_order_final: bool = True  # e.g. True: DPM++ uses first order on the last step when < 15 steps
    euler_at_final: bool = False  # e.g. False: DPM++ always uses first order on the last step

    def __post_init__(self):
        if self.trained_betas is not None:  # JSON gives a list; the frozen dataclass wants a hashable tuple
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        _check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++",))
        _check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        _check_choice("solver_order", self.solver_order, (1, 2))
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
            raise ValueError(f"SchedulerConfig: num_train_timesteps must be an int >= 2, "
                             f"got {self.num_train_timesteps!r}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"SchedulerConfig: trained_betas has {len(self.trained_betas)} values, "
                             f"num_train_timesteps is {self.num_train_timesteps}")
        if self.trained_betas is None and not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"SchedulerConfig: need 0 < beta_start < beta_end < 1, "
                             f"got beta_start={self.beta_start}, beta_end={self.beta_end}")
        if not (isinstance(self.steps_offset, int) and self.steps_offset >= 0):
            raise ValueError(f"SchedulerConfig: steps_offset must be an int >= 0, got {self.steps_offset!r}")

    # -------------------------------------------------------------------------------------------- (de)serialise
    @classmethod
    def from_dict(cls, d, strict=True):
        """Build from a diffusers scheduler_config.json dict.

        Keys starting with "_" (`_class_name`, `_diffusers_version`) and settings that have no effect while the
        features they tune are off (`sample_max_value`, `dynamic_thresholding_ratio`, ...) are ignored. Features
        minisd does not implement are accepted only at their "off" value (e.g. `thresholding: false`); any other
        value is a ValueError naming the key. Unknown keys are a ValueError (strict=True) or ignored.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in d.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _OFF_ONLY_KEYS:
                off = _OFF_ONLY_KEYS[key]
                if value != off:
                    raise ValueError(f"SchedulerConfig: {key}={value!r} is not supported by minisd "
                                     f"(only {off!r}); remove it from the config or use diffusers")
                continue
            if key == "variance_type" and value is None:  # DPM-Solver's "no learned variance" = DDPM's default
                continue
            if key in fields:
                kwargs[key] = value
            else:
                unknown.append(key)
        if unknown and strict:
            raise ValueError(f"SchedulerConfig: unknown key(s) {sorted(unknown)}; known: {sorted(fields)} "
                             f"(pass strict=False to ignore them)")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path, strict=True):
        """Read a diffusers scheduler_config.json (e.g. <model>/scheduler/scheduler_config.json)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), strict=strict)

    def to_dict(self):
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"SchedulerConfig: {name} must be one of {list(allowed)}, got {value!r}")


# diffusers keys whose value does not matter here (they only tune features that are off, or are step-time knobs)
_IGNORED_KEYS = {"sample_max_value", "dynamic_thresholding_ratio", "flow_shift", "time_shift_type"}
# diffusers features minisd does not implement: accepted only at this "off" value
_OFF_ONLY_KEYS = {"thresholding": False, "rescale_betas_zero_snr": False, "use_exponential_sigmas": False,
                  "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
                  "use_dynamic_shifting": False, "interpolation_type": "linear", "timestep_type": "discrete",
                  "lambda_min_clipped": -math.inf}

# Stable Diffusion 1.x (v1-5/scheduler/scheduler_config.json, a PNDMScheduler config); the fields it leaves out
# (prediction_type, timestep_spacing) take PNDMScheduler's defaults, which are the values written here.
SD15_SCHEDULER = SchedulerConfig(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                 beta_schedule="scaled_linear", trained_betas=None, prediction_type="epsilon",
                                 timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                 clip_sample=False, skip_prk_steps=True)


# ----------------------------------------------------------------------------------------------------------------
# the schedule

def make_betas(config, dtype=np.float32):
    """beta_t for t = 0..T-1, shape (T,), computed in float64 and rounded once to `dtype`.

    linear:            linspace(beta_start, beta_end, T)                    (DDPM)
    scaled_linear:     linspace(sqrt(beta_start), sqrt(beta_end), T)^2      (SD; LDM calls this "linear")
    squaredcos_cap_v2: 1 - abar(t+1)/abar(t), abar(t) = cos((t/T + s)/(1 + s) * pi/2)^2, s = 0.008, capped
                       at 0.999 (iDDPM eq. 17; the cap stops beta = 1 at t = T-1)
    diffusers builds linear/scaled_linear with a float32 linspace, so its values can differ from these in the
    last bit; LDM builds them in float64 (dtype=np.float64 here) and stores float32.
    """
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float64)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2
        def abar(t):
            return np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        t1 = np.arange(T, dtype=np.float64) / T
        t2 = np.arange(1, T + 1, dtype=np.float64) / T
        betas = np.minimum(1 - abar(t2) / abar(t1), 0.999)
    return betas.astype(dtype)


def make_alphas_cumprod(betas):
    """abar_t = prod_{s<=t} (1 - beta_s), shape (T,), in betas.dtype; the product runs in float64 (see top)."""
    alphas = 1 - betas  # in betas.dtype, as diffusers (float32) and LDM (float64) do
    return np.cumprod(alphas.astype(np.float64)).astype(betas.dtype)


def sigmas_from_alphas_cumprod(alphas_cumprod):
    """sigma_t = sqrt((1 - abar_t) / abar_t), shape (T,), increasing in t (SD: 0.0292 at t=0, 14.61 at t=999)."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def snr(alphas_cumprod, t=None):
    """Signal-to-noise ratio abar / (1 - abar): (T,) for every t, or at t (int or (N,) ints)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    if t is not None:
        a = a[to_numpy(t)]
    return a / (1 - a)


# ----------------------------------------------------------------------------------------------------------------
# forward process, conversions, training target

def alpha_bar_at(alphas_cumprod, t, x):
    """abar_t shaped to broadcast against x (N, ...): a Python float for a scalar t, else an (N, 1, ..., 1) array
    of x's dtype on x's device. t: int, 0-d array or (N,) int array (one timestep per batch element)."""
    t_host = to_numpy(t)
    if t_host.ndim == 0:
        return float(alphas_cumprod[int(t_host)])
    if t_host.shape != (x.shape[0],):
        raise ValueError(f"alpha_bar_at: argument 't' must be a scalar or have shape ({x.shape[0]},), "
                         f"got {tuple(t_host.shape)}")
    a = np.asarray(alphas_cumprod)[t_host].astype(np.float64)
    return xp_of(x).asarray(a.reshape((-1,) + (1,) * (x.ndim - 1)), dtype=x.dtype)  # (N, 1, 1, 1)


def _sqrt(a):
    return math.sqrt(a) if isinstance(a, float) else xp_of(a).sqrt(a)


def q_sample(x0, t, noise, alphas_cumprod):
    """Forward diffusion in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4).

    x0, noise: (N, ...) same shape and dtype; t: int or (N,) ints; alphas_cumprod: (T,). Returns (N, ...).
    """
    _check_pair("q_sample", x0, noise)
    a = alpha_bar_at(alphas_cumprod, t, x0)
    return _sqrt(a) * x0 + _sqrt(1 - a) * noise


def velocity(x0, noise, t, alphas_cumprod):
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho §4), the v_prediction target. (N, ...)."""
    _check_pair("velocity", x0, noise)
    a = alpha_bar_at(alphas_cumprod, t, x0)
    return _sqrt(a) * noise - _sqrt(1 - a) * x0


def x0_from_prediction(model_output, x_t, alpha_bar, prediction_type):
    """The clean sample implied by a network output at noise level alpha_bar (float or broadcastable array).

    epsilon:      x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)         (inverts q_sample)
    v_prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v               (substitute x_t and v, use a + (1-a) = 1)
    sample:       x0 = model_output
    """
    if prediction_type == "epsilon":
        return (x_t - _sqrt(1 - alpha_bar) * model_output) / _sqrt(alpha_bar)
    if prediction_type == "v_prediction":
        return _sqrt(alpha_bar) * x_t - _sqrt(1 - alpha_bar) * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"x0_from_prediction: prediction_type must be one of {list(PREDICTION_TYPES)}, "
                     f"got {prediction_type!r}")


def eps_from_prediction(model_output, x_t, alpha_bar, prediction_type):
    """The noise implied by a network output at noise level alpha_bar (float or broadcastable array).

    epsilon:      eps = model_output
    v_prediction: eps = sqrt(abar) v + sqrt(1 - abar) x_t
    sample:       eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)          (undefined at abar = 1)
    """
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return _sqrt(alpha_bar) * model_output + _sqrt(1 - alpha_bar) * x_t
    if prediction_type == "sample":
        return (x_t - _sqrt(alpha_bar) * model_output) / _sqrt(1 - alpha_bar)
    raise ValueError(f"eps_from_prediction: prediction_type must be one of {list(PREDICTION_TYPES)}, "
                     f"got {prediction_type!r}")


def v_from_x0_eps(x0, eps, alpha_bar):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 for a float or broadcastable alpha_bar."""
    return _sqrt(alpha_bar) * eps - _sqrt(1 - alpha_bar) * x0


def training_target(x0, noise, t, prediction_type, alphas_cumprod):
    """What the network should output for x_t = q_sample(x0, t, noise): L_simple regresses onto this.

    epsilon -> noise (DDPM eq. 14), v_prediction -> velocity(x0, noise, t), sample -> x0. Shapes (N, ...).
    The loss itself is the plain MSE between the network output and this target (minisd.ops.loss).
    """
    _check_pair("training_target", x0, noise)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, alphas_cumprod)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"training_target: prediction_type must be one of {list(PREDICTION_TYPES)}, "
                     f"got {prediction_type!r}")


def sample_timesteps(rng, n, num_train_timesteps):
    """t ~ U{0, ..., T-1}, one per batch element: (n,) int64 (the training-time draw, LDM ddpm.py)."""
    return rng.integers(0, num_train_timesteps, size=n, dtype=np.int64)


def _check_pair(op, x0, noise):
    if tuple(x0.shape) != tuple(noise.shape):
        raise ValueError(f"{op}: argument 'noise' must have shape {tuple(x0.shape)} like x0, got {tuple(noise.shape)}")
    if x0.dtype != noise.dtype:
        raise ValueError(f"{op}: argument 'noise' has dtype {noise.dtype} but 'x0' has {x0.dtype}; "
                         f"convert one of them (e.g. .astype(np.float32))")


# ----------------------------------------------------------------------------------------------------------------
# inference timesteps and sigma spacings (shared by the samplers)

def spaced_timesteps(config, num_steps, integer=True):
    """The num_steps training timesteps a sampler visits, descending, shape (S,) (Lin et al. Table 2):

    leading:   arange(S) * (T // S), reversed, + steps_offset       SD, S=50: 981, 961, ..., 21, 1
    trailing:  round(arange(T, 0, -T / S)) - 1                      S=50: 999, 979, ..., 39, 19
    linspace:  linspace(0, T - 1, S), reversed                      S=50: 999, 978.6, ..., 20.4, 0
    integer=True rounds linspace to ints (DDPM/DDIM/PNDM, int64); integer=False keeps diffusers' fractional
    float32 linspace timesteps (Euler, Euler a, LMS interpolate sigma between the integer training steps).
    """
    T = config.num_train_timesteps
    if not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= T):
        raise ValueError(f"set_timesteps: num_steps must be an int in [1, {T}], got {num_steps!r}")
    spacing = config.timestep_spacing
    if spacing == "leading":
        t = np.arange(num_steps)[::-1] * (T // num_steps) + config.steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / num_steps)) - 1
    else:  # linspace
        t = np.linspace(0, T - 1, num_steps)[::-1]
        if integer:
            t = np.round(t)
    return t.astype(np.int64) if integer else t.astype(np.float32)


def karras_sigmas(sigma_min, sigma_max, n, rho=7.0):
    """Karras et al. eq. 5: n sigmas from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho). (n,)

    rho = 7 spends more steps at low noise than uniform-in-t spacing does (the paper's choice)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma, log_sigmas):
    """Map noise levels back to (fractional) training timesteps by linear interpolation in log sigma.

    sigma: (S,) noise levels; log_sigmas: (T,) log of the training sigmas (increasing). Returns (S,) float64
    in [0, T-1]. Levels outside the table clamp to its ends (as diffusers' _sigma_to_t does).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigmas = np.asarray(log_sigmas)
    log_sigma = np.log(np.maximum(sigma, 1e-10))  # sigma = 0 (end of sampling) maps to t = 0
    # low = the last table index whose log sigma is <= log_sigma, kept below T-1 so low + 1 exists
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low].astype(np.float64), log_sigmas[low + 1].astype(np.float64)
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)
