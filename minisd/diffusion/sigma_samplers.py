"""Samplers that integrate the probability-flow ODE in sigma: Euler, Euler ancestral, LMS, DPM-Solver++ 2M.

Dividing x_t = sqrt(abar) x0 + sqrt(1 - abar) eps by sqrt(abar) gives x = x0 + sigma eps with
sigma = sqrt((1 - abar)/abar) (schedule.py). In this "sigma space" (Karras et al. 2022, k-diffusion) the
denoising ODE is simply dx/dsigma = (x - x0_hat(x, sigma)) / sigma, and each sampler is an ODE/SDE solver:

    Euler          one slope per step                                           x += d (sigma_next - sigma)
    Euler a        Euler to sigma_down, then add fresh noise of std sigma_up     (ancestral, stochastic)
    LMS            Adams-type linear multistep on the slopes (order 4)
    DPM++ 2M       exact exponential integrator on x0 predictions, 2nd order multistep (works in VP space)

Euler/Euler a/LMS keep x in sigma space, so the first x is noise * init_noise_sigma (~sigma_max) and the
network sees scale_model_input(x) = x / sqrt(sigma^2 + 1) (back to unit variance, what it was trained on).
DPM++ keeps the VP sample x_t (init_noise_sigma 1, no input scaling).

Noise levels: `set_timesteps` picks S timesteps (schedule.spaced_timesteps), reads sigma at each by linear
interpolation in t, or (use_karras_sigmas) spaces S sigmas by Karras' rho=7 rule and maps them back to
fractional timesteps (Euler/LMS) or rounded ones (DPM++, as diffusers). A final sigma (0, or sigma_0 for
final_sigmas_type="sigma_min") is appended: self.sigmas has S + 1 entries, self.timesteps S.

Shapes: x, model_output (N, ...). Scalars are Python floats (float64) from the float32 sigma table.

References (pinned):
  Karras et al. 2022, https://arxiv.org/abs/2206.00364 (Algorithm 1-2, eq. 5)
  DPM-Solver++, Lu et al. 2022, https://arxiv.org/abs/2211.01095 (Algorithm 2, "2M")
  k-diffusion @ 686dbad0: k_diffusion/sampling.py (sample_euler, sample_euler_ancestral, get_ancestral_step,
    sample_lms, sample_dpmpp_2m)
    https://github.com/crowsonkb/k-diffusion/blob/686dbad0f39640ea25c8a8c6a6e56bb40eacefa2/k_diffusion/sampling.py
  diffusers @ 58eb52c0: scheduling_euler_discrete.py, scheduling_euler_ancestral_discrete.py,
    scheduling_lms_discrete.py, scheduling_dpmsolver_multistep.py
    https://github.com/huggingface/diffusers/tree/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers
"""
import math

import numpy as np
from numpy.polynomial import polynomial as P

from ..backend import to_numpy, xp_of
from .samplers import Sampler, draw_noise
from .schedule import karras_sigmas, sigma_to_t, sigmas_from_alphas_cumprod, spaced_timesteps


class _SigmaSampler(Sampler):
    """Shared by Euler, Euler a and LMS: the sigma table, the step counter and sigma-space helpers."""
    final_sigma_from_config = True  # Euler honours final_sigmas_type; Euler a and LMS always end at 0

    def __init__(self, config):
        super().__init__(config)
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float32, increasing in t
        self.sigmas = None  # (S + 1,) float32 after set_timesteps
        self.step_index = None  # which sigma the next step starts from
        self.begin_index = None  # set for img2img, which starts part-way down the list

    def set_timesteps(self, num_steps):
        cfg, T = self.config, self.config.num_train_timesteps
        t = spaced_timesteps(cfg, num_steps, integer=False)  # (S,) float32
        sig = np.interp(t, np.arange(T), self.train_sigmas)  # (S,) sigma between the integer training steps
        if cfg.use_karras_sigmas:
            # Karras' range is the first and last sigma *visited* (diffusers), not the training table's ends
            lo = cfg.sigma_min if cfg.sigma_min is not None else float(sig[-1])
            hi = cfg.sigma_max if cfg.sigma_max is not None else float(sig[0])
            sig = karras_sigmas(lo, hi, num_steps)
            t = sigma_to_t(sig, np.log(self.train_sigmas))  # fractional timesteps for the network
        last = 0.0
        if self.final_sigma_from_config and cfg.final_sigmas_type == "sigma_min":
            last = float(self.train_sigmas[0])
        self.sigmas = np.concatenate([sig, [last]]).astype(np.float32)  # (S + 1,)
        self.timesteps = t.astype(np.float32)
        self.num_inference_steps = num_steps
        self.step_index = self.begin_index = None
        # std of the first x. In sigma space x = x_t / sqrt(abar) = x_t sqrt(sigma^2 + 1), so VP noise
        # x_t ~ N(0, 1) has std sqrt(sigma_max^2 + 1): diffusers' choice for "leading" (SD). For linspace and
        # trailing it follows k-diffusion's sigma_max (the 1 is small next to sigma_max^2 ~ 214 for SD).
        s_max = float(self.sigmas.max())
        self.init_noise_sigma = s_max if cfg.timestep_spacing in ("linspace", "trailing") else \
            math.sqrt(s_max ** 2 + 1)

    def set_begin_index(self, begin_index=0):
        """Start stepping at this index of self.timesteps (img2img starts part-way; pipelines call this)."""
        self.begin_index = int(begin_index)

    def index_for_timestep(self, t):
        """Index of t in self.timesteps. If t is listed twice (possible with Karras spacing) the second is
        taken, as diffusers does, so a schedule entered part-way does not skip a sigma."""
        hits = np.flatnonzero(self.timesteps == np.float32(to_numpy(t)))
        if len(hits) == 0:
            raise ValueError(f"{type(self).__name__}: timestep {t} is not in this sampler's timesteps "
                             f"{self.timesteps.tolist()[:6]}...; pass one of sampler.timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, t):
        if self.step_index is None:
            self.step_index = self.begin_index if self.begin_index is not None else self.index_for_timestep(t)

    def scale_model_input(self, x, t):
        """x / sqrt(sigma^2 + 1): the sigma-space sample back at unit variance for the network."""
        if self.timesteps is None:
            raise ValueError(f"{type(self).__name__}.scale_model_input: call set_timesteps(num_steps) first")
        self._init_step_index(t)
        return x / math.sqrt(float(self.sigmas[self.step_index]) ** 2 + 1)

    def add_noise(self, x0, noise, t):
        """x0 + sigma(t) noise (sigma space). t: a timestep from self.timesteps, or an (N,) array of them."""
        t_host = np.atleast_1d(to_numpy(t))
        if self.begin_index is None:
            idx = [self.index_for_timestep(ti) for ti in t_host]
        else:
            idx = [self.step_index if self.step_index is not None else self.begin_index] * len(t_host)
        sig = self.sigmas[idx].astype(np.float64)  # (N,) or (1,)
        if len(sig) == 1:
            return x0 + float(sig[0]) * noise
        sig = sig.reshape((-1,) + (1,) * (x0.ndim - 1))  # (N, 1, 1, 1)
        return x0 + _to_like(sig, x0) * noise

    def _x0(self, model_output, x, sigma):
        """x0 estimate from the network output at noise level sigma (x is in sigma space).

        epsilon: x = x0 + sigma eps. v_prediction: the network saw x / sqrt(sigma^2+1) = sqrt(abar) x0 +
        sqrt(1-abar) eps with sqrt(abar) = 1/sqrt(sigma^2+1), so x0 = x/(sigma^2+1) - sigma/sqrt(sigma^2+1) v.
        """
        kind = self.config.prediction_type
        if kind == "epsilon":
            return x - sigma * model_output
        if kind == "v_prediction":
            return (-sigma / math.sqrt(sigma ** 2 + 1)) * model_output + x / (sigma ** 2 + 1)
        return model_output  # "sample"


def _to_like(a, x):
    """Host float64 array a -> x's array module and dtype."""
    return xp_of(x).asarray(a, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------------

class EulerSampler(_SigmaSampler):
    """Euler's method on dx/dsigma = (x - x0)/sigma (Karras Algorithm 2 with s_churn = 0: deterministic)."""
    name = "euler"

    def step(self, model_output, t, x, rng=None, noise=None):
        """x (N, ...) at sigma_i -> x at sigma_{i+1}. Deterministic; rng/noise are accepted and unused."""
        self._check_step(model_output, x)
        self._init_step_index(t)
        sigma, sigma_next = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        x0 = self._x0(model_output, x, sigma)
        self.pred_original_sample = x0
        d = (x - x0) / sigma  # the ODE slope dx/dsigma
        self.step_index += 1
        return x + d * (sigma_next - sigma)


class EulerAncestralSampler(_SigmaSampler):
    """Euler ancestral (k-diffusion sample_euler_ancestral, eta = 1): a deterministic Euler step down to
    sigma_down, then fresh noise of std sigma_up, chosen so sigma_down^2 + sigma_up^2 = sigma_next^2 and the
    noise added matches the DDPM posterior (get_ancestral_step). Stochastic: step needs rng or noise.
    diffusers' class has no Karras option; here use_karras_sigmas works as for Euler."""
    name = "euler_a"
    final_sigma_from_config = False

    def step(self, model_output, t, x, rng=None, noise=None):
        """x (N, ...) at sigma_i -> x at sigma_{i+1}; noise (N, ...) or rng supplies z."""
        self._check_step(model_output, x)
        self._init_step_index(t)
        s_from, s_to = float(self.sigmas[self.step_index]), float(self.sigmas[self.step_index + 1])
        x0 = self._x0(model_output, x, s_from)
        self.pred_original_sample = x0
        s_up = math.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
        s_down = math.sqrt(s_to ** 2 - s_up ** 2)
        d = (x - x0) / s_from
        x_next = x + d * (s_down - s_from)
        if s_up > 0:  # the final step (sigma_to = 0) adds nothing, so it needs no noise
            x_next = x_next + s_up * draw_noise("EulerAncestralSampler.step", x, rng, noise)
        self.step_index += 1
        return x_next


class LMSSampler(_SigmaSampler):
    """Linear multistep (k-diffusion sample_lms, order 4): x += sum_j c_j d_{i-j}, where c_j integrates the
    Lagrange basis polynomial of the past sigmas over [sigma_i, sigma_{i+1}]. The integrand is a polynomial,
    so it is integrated exactly (diffusers calls scipy's quad for the same numbers)."""
    name = "lms"
    final_sigma_from_config = False

    def __init__(self, config, order=4):
        super().__init__(config)
        self.order = int(order)
        self.derivatives = []

    def set_timesteps(self, num_steps):
        super().set_timesteps(num_steps)
        self.derivatives = []

    def lms_coefficient(self, order, i, j):
        """c_j = integral over s from sigma_i to sigma_{i+1} of the Lagrange basis polynomial of node j:
        prod_{k < order, k != j} (s - sigma_{i-k}) / (sigma_{i-j} - sigma_{i-k}). Returns a Python float."""
        s = self.sigmas.astype(np.float64)
        others = [s[i - k] for k in range(order) if k != j]
        poly = P.polyfromroots(others) / np.prod([s[i - j] - o for o in others])  # coefficients, low order first
        antideriv = P.polyint(poly)
        return float(P.polyval(s[i + 1], antideriv) - P.polyval(s[i], antideriv))

    def step(self, model_output, t, x, rng=None, noise=None):
        """x (N, ...) at sigma_i -> x at sigma_{i+1}. Deterministic."""
        self._check_step(model_output, x)
        self._init_step_index(t)
        i = self.step_index
        sigma = float(self.sigmas[i])
        x0 = self._x0(model_output, x, sigma)
        self.pred_original_sample = x0
        self.derivatives = (self.derivatives + [(x - x0) / sigma])[-self.order:]  # newest last
        order = min(i + 1, self.order)
        for j in range(order):  # d_{i-j} is derivatives[-1-j]
            x = x + self.lms_coefficient(order, i, j) * self.derivatives[-1 - j]
        self.step_index += 1
        return x


# ----------------------------------------------------------------------------------------------------------------

class DPMSolverMultistepSampler(Sampler):
    """DPM-Solver++ multistep (Lu et al. 2022, Algorithm 2), order 1 or 2: "DPM++ 2M" for order 2.

    Per noise level sigma: alpha = 1/sqrt(sigma^2+1), s = sigma alpha (the VP coefficients, x_t = alpha x0 + s eps)
    and lambda = log(alpha/s) = -log(sigma). The network output is turned into a data prediction m (x0), and
    with h = lambda_next - lambda_i (so e^-h = sigma_next/sigma_i):
        1st order:  x_next = (s_next/s_i) x - alpha_next (e^-h - 1) m_i
        2nd order:  r = h_prev/h, D1 = (m_i - m_{i-1})/r,
                    x_next = (s_next/s_i) x - alpha_next (e^-h - 1) (m_i + D1/2)              (midpoint)
                    x_next = ... - alpha_next (e^-h - 1) m_i + alpha_next ((e^-h - 1)/h + 1) D1 (heun)
    The first step is first order (no history). The last step is first order when final_sigmas_type is "zero"
    (sigma_next = 0 makes h infinite; the update is then just x0 = m_i), with euler_at_final, or with
    lower_order_final and fewer than 15 steps (2nd order there is unstable, diffusers/k-diffusion).
    """
    name = "dpmpp_2m"

    def __init__(self, config):
        super().__init__(config)
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # (T,) float32
        self.sigmas = None
        self.step_index = self.begin_index = None
        self.model_outputs = []  # past data predictions m, newest last (at most solver_order)
        self.lower_order_nums = 0

    def set_timesteps(self, num_steps):
        cfg, T = self.config, self.config.num_train_timesteps
        if not (isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= T):
            raise ValueError(f"set_timesteps: num_steps must be an int in [1, {T}], got {num_steps!r}")
        # diffusers' DPM-Solver spaces S+1 points and drops the last (t = 0) for linspace/leading, unlike
        # the other samplers, so "leading" with S=20 gives 952, 905, ..., 48 (+ steps_offset)
        if cfg.timestep_spacing == "linspace":
            t = np.round(np.linspace(0, T - 1, num_steps + 1))[::-1][:-1]
        elif cfg.timestep_spacing == "leading":
            t = (np.arange(num_steps + 1) * (T // (num_steps + 1)))[::-1][:-1] + cfg.steps_offset
        else:  # trailing
            t = np.round(np.arange(T, 0, -T / num_steps)) - 1
        t = t.astype(np.int64)
        if cfg.use_karras_sigmas:
            # here the Karras range is the whole training table (sigma_0 .. sigma_{T-1})
            lo = cfg.sigma_min if cfg.sigma_min is not None else float(self.train_sigmas[0])
            hi = cfg.sigma_max if cfg.sigma_max is not None else float(self.train_sigmas[-1])
            sig = karras_sigmas(lo, hi, num_steps)
            t = sigma_to_t(sig, np.log(self.train_sigmas))
            if cfg.beta_schedule != "squaredcos_cap_v2":  # diffusers rounds, except for the cosine schedule
                t = np.round(t)
            t = t.astype(np.int64)
        else:
            sig = np.interp(t, np.arange(T), self.train_sigmas)
        last = 0.0 if cfg.final_sigmas_type == "zero" else float(self.train_sigmas[0])
        self.sigmas = np.concatenate([sig, [last]]).astype(np.float32)  # (S + 1,)
        self.timesteps = t
        self.num_inference_steps = len(t)
        self.model_outputs = []
        self.lower_order_nums = 0
        self.step_index = self.begin_index = None

    def set_begin_index(self, begin_index=0):
        self.begin_index = int(begin_index)

    def index_for_timestep(self, t):
        """Index of t in self.timesteps (the second one if listed twice; the last step if absent: diffusers)."""
        hits = np.flatnonzero(self.timesteps == int(to_numpy(t)))
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    @staticmethod
    def _alpha_s(sigma):
        """VP coefficients (alpha, s) of noise level sigma: x_t = alpha x0 + s eps."""
        alpha = 1 / math.sqrt(sigma ** 2 + 1)
        return alpha, sigma * alpha

    def step(self, model_output, t, x, rng=None, noise=None):
        """x_t (N, ...) -> x at the next timestep. Deterministic; rng/noise are accepted and unused."""
        self._check_step(model_output, x)
        if self.step_index is None:
            self.step_index = self.begin_index if self.begin_index is not None else self.index_for_timestep(t)
        cfg, i, n = self.config, self.step_index, len(self.timesteps)
        lower_order_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                            or cfg.final_sigmas_type == "zero")
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        alpha, s = self._alpha_s(sigma)
        alpha_next, s_next = self._alpha_s(sigma_next)
        if cfg.prediction_type == "epsilon":
            m = (x - s * model_output) / alpha
        elif cfg.prediction_type == "v_prediction":
            m = alpha * x - s * model_output
        else:  # sample
            m = model_output
        self.pred_original_sample = m
        self.model_outputs = (self.model_outputs + [m])[-cfg.solver_order:]
        exp_neg_h = sigma_next / sigma  # e^-h, exact even when sigma_next = 0 (h = inf)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            x_next = (s_next / s) * x - (alpha_next * (exp_neg_h - 1)) * m
        else:
            sigma_prev = float(self.sigmas[i - 1])
            h = math.log(sigma / sigma_next)  # lambda_next - lambda_i
            h_prev = math.log(sigma_prev / sigma)  # lambda_i - lambda_{i-1}
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            d1 = (m0 - m1) * (h / h_prev)  # D1 = (m0 - m1) / r, r = h_prev / h
            x_next = (s_next / s) * x - (alpha_next * (exp_neg_h - 1)) * m0
            if cfg.solver_type == "midpoint":
                x_next = x_next - (0.5 * alpha_next * (exp_neg_h - 1)) * d1
            else:  # heun
                x_next = x_next + (alpha_next * ((exp_neg_h - 1) / h + 1)) * d1
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self.step_index += 1
        return x_next

    def add_noise(self, x0, noise, t):
        """alpha(t) x0 + s(t) noise with the sigma of timestep t (from self.timesteps; (N,) array allowed)."""
        t_host = np.atleast_1d(to_numpy(t))
        if self.begin_index is None:
            idx = [self.index_for_timestep(ti) for ti in t_host]
        else:
            idx = [self.step_index if self.step_index is not None else self.begin_index] * len(t_host)
        sig = self.sigmas[idx].astype(np.float64)
        alpha = 1 / np.sqrt(sig ** 2 + 1)
        s = sig * alpha
        if len(sig) == 1:
            return float(alpha[0]) * x0 + float(s[0]) * noise
        shape = (-1,) + (1,) * (x0.ndim - 1)  # (N, 1, 1, 1)
        return _to_like(alpha.reshape(shape), x0) * x0 + _to_like(s.reshape(shape), x0) * noise
