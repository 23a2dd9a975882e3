"""Samplers that step the discrete-time chain directly: DDPM, DDIM, PNDM/PLMS (+ the `Sampler` base class).

Every sampler mirrors the API of the diffusers scheduler it reproduces, so the two can be compared step by
step and a pipeline reads the same:

    sampler = DDIMSampler(SD15_SCHEDULER)
    sampler.set_timesteps(50)                       # sampler.timesteps: (S,) descending training timesteps
    x = noise * sampler.init_noise_sigma            # (N, C, H, W)
    for t in sampler.timesteps:
        out = unet(sampler.scale_model_input(x, t), t, context)      # eps, v or x0 (config.prediction_type)
        x = sampler.step(out, t, x)                 # x_{t} -> x_{t_prev}; stochastic ones take rng= or noise=
    # sampler.pred_original_sample holds the last step's x0 estimate where diffusers exposes it

Notation (see schedule.py): abar_t = alphas_cumprod[t], "prev" = the next (smaller) timestep visited.
Scalars (abar, coefficients) are Python floats computed in float64 from the float32 table; arrays keep the
dtype of x (float32 / float64; CuPy arrays work unchanged, the schedule stays on the host).

References (pinned):
  DDPM, Ho et al. 2020, https://arxiv.org/abs/2006.11239 (Algorithm 2, eq. 6-7)
  DDIM, Song et al. 2020, https://arxiv.org/abs/2010.02502 (eq. 12, 16)
  PNDM, Liu et al. 2022, https://arxiv.org/abs/2202.09778 (eq. 9 transfer; the PRK and PLMS methods)
  diffusers @ 58eb52c0: scheduling_ddpm.py, scheduling_ddim.py, scheduling_pndm.py
    https://github.com/huggingface/diffusers/tree/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers
  CompVis @ 21f890f9: ldm/models/diffusion/ddim.py, plms.py (SD's original samplers; same updates)
    https://github.com/CompVis/stable-diffusion/tree/21f890f9/ldm/models/diffusion
"""
import math

import numpy as np

from ..backend import to_numpy, xp_of
from .schedule import (eps_from_prediction, make_alphas_cumprod, make_betas, q_sample, spaced_timesteps,
                       x0_from_prediction)


class Sampler:
    """What every sampler shares: the schedule, the timestep list and the diffusers-style method names."""
    name = "base"

    def __init__(self, config):
        self.config = config
        self.betas = make_betas(config)  # (T,) float32
        self.alphas_cumprod = make_alphas_cumprod(self.betas)  # (T,) float32
        self.num_inference_steps = None
        self.timesteps = None  # (S,) set by set_timesteps
        self.init_noise_sigma = 1.0  # the initial noise is N(0, init_noise_sigma^2)
        self.pred_original_sample = None  # x0 estimate of the last step (where the sampler computes one)

    def set_timesteps(self, num_steps):
        raise NotImplementedError

    def scale_model_input(self, x, t):
        """The network input at step t. Identity here; sigma-space samplers divide by sqrt(sigma^2 + 1)."""
        return x

    def step(self, model_output, t, x, rng=None, noise=None):
        raise NotImplementedError

    def add_noise(self, x0, noise, t):
        """Noise clean samples to timestep t (img2img start): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def __repr__(self):
        return f"{type(self).__name__}(num_inference_steps={self.num_inference_steps}, config={self.config})"

    # -------------------------------------------------------------------------------------------- helpers
    def _abar(self, t):
        """abar_t as a Python float; abar for t < 0 (past the last step) is 1: the clean data."""
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def _check_step(self, model_output, x):
        op = f"{type(self).__name__}.step"
        if self.timesteps is None:
            raise ValueError(f"{op}: call set_timesteps(num_steps) before step")
        if tuple(model_output.shape) != tuple(x.shape):
            raise ValueError(f"{op}: argument 'model_output' must have shape {tuple(x.shape)} like the sample, "
                             f"got {tuple(model_output.shape)}")
        if model_output.dtype != x.dtype:
            raise ValueError(f"{op}: argument 'model_output' has dtype {model_output.dtype} but the sample has "
                             f"{x.dtype}; convert one of them (e.g. .astype(np.float32))")


def draw_noise(op, x, rng, noise):
    """Standard normal noise shaped like x: `noise` itself if given (checked), else drawn from `rng`.

    Randomness is explicit (DEVELOPERS.md rule 5): a stochastic step with neither is an error, never a hidden
    global generator. rng: np.random.Generator (or cupy's); the draw lands on x's device in x's dtype.
    """
    if noise is not None:
        if tuple(noise.shape) != tuple(x.shape):
            raise ValueError(f"{op}: argument 'noise' must have shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        if noise.dtype != x.dtype:
            raise ValueError(f"{op}: argument 'noise' has dtype {noise.dtype} but the sample has {x.dtype}; "
                             f"convert one of them (e.g. .astype(np.float32))")
        return noise
    if rng is None:
        raise ValueError(f"{op}: this step adds noise; pass rng=np.random.default_rng(seed) or noise=<array>")
    z = rng.standard_normal(x.shape, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    return xp_of(x).asarray(z, dtype=x.dtype)


def _reject_karras(sampler):
    if sampler.config.use_karras_sigmas:
        raise ValueError(f"{type(sampler).__name__}: use_karras_sigmas=True has no meaning for this sampler "
                         f"(it steps integer timesteps); use euler, euler_a, lms or dpmpp_2m with Karras sigmas")


# ----------------------------------------------------------------------------------------------------------------
# DDPM (ancestral sampling from the posterior q(x_prev | x_t, x0))

class DDPMSampler(Sampler):
    """DDPM ancestral sampling (Ho et al. Algorithm 2), generalised to skipped steps like diffusers.

    With prev the next timestep visited and abar' = abar_t / abar_prev (the "alpha" of the jump), beta' = 1 - abar':
        x0   = from the model output, clipped to +-clip_sample_range if clip_sample
        mean = sqrt(abar_prev) beta' / (1 - abar_t) x0 + sqrt(abar') (1 - abar_prev) / (1 - abar_t) x_t   (eq. 7)
        x_prev = mean + sqrt(var) z,  var = beta' (1 - abar_prev) / (1 - abar_t) (fixed_small) or beta' (fixed_large)
    and no noise on the final step (t = 0 in the full chain).
    """
    name = "ddpm"

    def __init__(self, config):
        super().__init__(config)
        _reject_karras(self)
        T = config.num_train_timesteps
        self.timesteps = np.arange(T - 1, -1, -1, dtype=np.int64)  # the full chain until set_timesteps

    def set_timesteps(self, num_steps):
        self.timesteps = spaced_timesteps(self.config, num_steps)
        self.num_inference_steps = num_steps

    def previous_timestep(self, t):
        """The timestep after t in self.timesteps, or -1 after the last (t-1 for the full chain)."""
        i = _index_of(self.timesteps, t, "DDPMSampler")
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def get_variance(self, t, variance_type=None):
        """Variance of the noise added when stepping from t (a Python float), as diffusers' _get_variance."""
        a_t, a_prev = self._abar(t), self._abar(self.previous_timestep(t))
        beta = 1 - a_t / a_prev  # beta' of the (possibly skipped) step
        # posterior variance beta~ (DDPM eq. 7); clamped because it is exactly 0 at t = 0 and its log is used
        # elsewhere (iDDPM's learned range); 1e-20 is diffusers' floor
        var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
        variance_type = variance_type or self.config.variance_type
        return var if variance_type == "fixed_small" else beta

    def step(self, model_output, t, x, rng=None, noise=None):
        """x_t (N, ...) -> x_prev (N, ...). Stochastic for t > 0: needs rng or noise (N, ...)."""
        self._check_step(model_output, x)
        t = int(t)
        a_t, a_prev = self._abar(t), self._abar(self.previous_timestep(t))
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        x0 = x0_from_prediction(model_output, x, a_t, self.config.prediction_type)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = xp_of(x0).clip(x0, -r, r)
        self.pred_original_sample = x0
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            z = draw_noise("DDPMSampler.step", x, rng, noise)
            mean = mean + math.sqrt(self.get_variance(t)) * z
        return mean


# ----------------------------------------------------------------------------------------------------------------
# DDIM

class DDIMSampler(Sampler):
    """DDIM (Song et al. eq. 12): predict x0 and eps, then jump to prev along the same noise direction.

        x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
        s = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)      (eq. 16)
    eta = 0 is deterministic (SD's default); eta = 1 is DDPM-like. After the last step abar_prev is 1
    (set_alpha_to_one) or abar_0 (SD: set_alpha_to_one=False, as CompVis' ddim.py).
    """
    name = "ddim"

    def __init__(self, config, eta=0.0):
        super().__init__(config)
        _reject_karras(self)
        if eta < 0:
            raise ValueError(f"DDIMSampler: eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def set_timesteps(self, num_steps):
        self.timesteps = spaced_timesteps(self.config, num_steps)
        self.num_inference_steps = num_steps

    def _abar_prev(self, prev_t):
        return float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod

    def get_variance(self, t, prev_t):
        """(1 - abar_prev)/(1 - abar_t) * (1 - abar_t/abar_prev): the DDPM posterior variance of the jump."""
        a_t, a_prev = float(self.alphas_cumprod[t]), self._abar_prev(prev_t)
        return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)

    def step(self, model_output, t, x, rng=None, noise=None):
        """x_t (N, ...) -> x_prev (N, ...). Stochastic when eta > 0: then needs rng or noise (N, ...)."""
        self._check_step(model_output, x)
        t = int(t)
        # diffusers (and CompVis) step back by T // S whatever the spacing, so with "linspace"/"trailing" the
        # jump target can differ from the next listed timestep; kept for step-by-step parity with diffusers.
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = float(self.alphas_cumprod[t]), self._abar_prev(prev_t)
        kind = self.config.prediction_type
        x0 = x0_from_prediction(model_output, x, a_t, kind)
        eps = eps_from_prediction(model_output, x, a_t, kind)  # from the unclipped x0, as diffusers
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = xp_of(x0).clip(x0, -r, r)
        self.pred_original_sample = x0
        std = self.eta * math.sqrt(self.get_variance(t, prev_t))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std ** 2) * eps
        if self.eta > 0:
            x_prev = x_prev + std * draw_noise("DDIMSampler.step", x, rng, noise)
        return x_prev


# ----------------------------------------------------------------------------------------------------------------
# PNDM / PLMS

class PNDMSampler(Sampler):
    """Pseudo numerical methods (Liu et al.): a linear multistep method on the DDIM "transfer" function.

    Transfer (eq. 9) from t to prev with a noise estimate e (= DDIM with eta 0, rearranged):
        x_prev = sqrt(abar_prev/abar_t) x_t - (abar_prev - abar_t) e / D,
        D = abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev)
    PLMS (skip_prk_steps=True, SD) combines the last eps with Adams-Bashforth weights 1; (3,-1)/2;
    (23,-16,5)/12; (55,-59,37,-9)/24. It has no history at the start, so the first step is Euler and the
    second one *redoes* the first interval with the mean of two eps (improved Euler): the 2nd timestep is
    listed twice and S steps cost S+1 model calls. PRK (skip_prk_steps=False) instead warms up with three
    4-stage Runge-Kutta steps at half-step spacing (12 calls) before PLMS takes over.
    """
    name = "pndm"

    def __init__(self, config):
        super().__init__(config)
        _reject_karras(self)
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"PNDMSampler: prediction_type must be epsilon or v_prediction, "
                             f"got {config.prediction_type!r}")
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self._reset()

    def _reset(self):
        self.ets = []  # past model outputs, newest last (at most 4 are used)
        self.counter = 0  # model calls so far
        self.cur_sample = None  # x at the start of the current multi-call step
        self.cur_model_output = 0  # running Runge-Kutta combination (PRK)

    def set_timesteps(self, num_steps):
        cfg, T = self.config, self.config.num_train_timesteps
        if not cfg.skip_prk_steps and num_steps < 4:
            raise ValueError(f"PNDMSampler: num_steps must be >= 4 with skip_prk_steps=False "
                             f"(the Runge-Kutta warm-up uses the last 4 steps), got {num_steps}")
        base = spaced_timesteps(cfg, num_steps)[::-1]  # (S,) ascending, e.g. 1, 21, ..., 981 (SD, S=50)
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            # the second-to-last ascending entry (the 2nd timestep visited) is repeated: see the class docstring
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            half = T // num_steps // 2
            # the 4 highest timesteps, each followed by its half-step: t, t + half (ascending)
            prk = np.repeat(base[-4:], 2) + np.tile([0, half], 4)  # (8,)
            # each 4-stage RK step evaluates at t, t - half, t - half, t - step: drop the last, double the inner
            self.prk_timesteps = np.repeat(prk[:-1], 2)[1:-1][::-1].copy()  # (12,)
            self.plms_timesteps = base[:-3][::-1].copy()  # PLMS continues from the 4th-highest timestep
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.num_inference_steps = num_steps
        self._reset()

    def step(self, model_output, t, x, rng=None, noise=None):
        """x (N, ...) -> the next sample (N, ...). Deterministic; rng and noise are accepted and unused."""
        self._check_step(model_output, x)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, t, x)
        return self.step_plms(model_output, t, x)

    def step_prk(self, model_output, t, x):
        """One of the 4 model calls of a pseudo Runge-Kutta step (classic RK4 weights 1/6, 1/3, 1/3, 1/6)."""
        step = self.config.num_train_timesteps // self.num_inference_steps
        # calls 0 and 2 of each group target the half step, 1 and 3 the full step from the group's start
        prev_t = int(t) - (0 if self.counter % 2 else step // 2)
        t_start = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = model_output / 6
            self.ets.append(model_output)  # the start-of-step eps feeds the later PLMS history
            self.cur_sample = x
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + model_output / 3
        else:
            model_output = self.cur_model_output + model_output / 6
            self.cur_model_output = 0
        # every stage transfers from the sample at the start of the RK step (cur_sample), not from x
        x_prev = self._transfer(self.cur_sample, t_start, prev_t, model_output)
        self.counter += 1
        return x_prev

    def step_plms(self, model_output, t, x):
        """One pseudo linear multistep (Adams-Bashforth) step, with the improved-Euler start described above."""
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMSampler.step_plms: run the 12 Runge-Kutta calls first (skip_prk_steps=False)")
        t = int(t)
        step = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - step
        if self.counter != 1:
            self.ets = self.ets[-3:] + [model_output]
        else:  # the repeated timestep: redo the first interval [t + step -> t]
            prev_t, t = t, t + step
        e = self.ets
        if len(e) == 1 and self.counter == 0:  # first call: plain Euler, remember where we started
            eps = model_output
            self.cur_sample = x
        elif len(e) == 1 and self.counter == 1:  # second call: average the two slopes, restart from there
            eps = (model_output + e[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        x_prev = self._transfer(x, t, prev_t, eps)
        self.counter += 1
        return x_prev

    def _transfer(self, x, t, prev_t, model_output):
        """PNDM eq. 9: the DDIM (eta = 0) update from t to prev_t written with eps only."""
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":
            # the multistep combination was made on raw v; convert it with this step's x and abar (as diffusers)
            model_output = eps_from_prediction(model_output, x, a_t, "v_prediction")
        denom = a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev)
        return math.sqrt(a_prev / a_t) * x - ((a_prev - a_t) / denom) * model_output


def _index_of(timesteps, t, who):
    hits = np.flatnonzero(timesteps == to_numpy(t))
    if len(hits) == 0:
        raise ValueError(f"{who}: timestep {t} is not in this sampler's timesteps {timesteps.tolist()[:6]}...")
    return int(hits[0])

