# Source of notebooks/02_denoising.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 2. Denoising: running the process backwards
#
# [Notebook 1](01_forward_diffusion.ipynb) destroyed images with a fixed Gaussian chain $q$. Generation runs a
# **learned** chain the other way, from pure noise $x_T \sim \mathcal N(0, I)$ down to an image $x_0$:
#
# $$p_\theta(x_{t-1} \mid x_t) = \mathcal{N}\!\left(\mu_\theta(x_t, t),\; \Sigma_\theta(x_t, t)\right).$$
#
# Two questions: what should the network predict so that we get $\mu_\theta$, and what is $\Sigma_\theta$?
# This notebook answers both with minisd's samplers and, instead of a trained network, *ideal* denoisers we can
# write down exactly for toy data. About 20 s on a laptop CPU; it needs MNIST for the last part.

# %%
import dataclasses

import numpy as np
import matplotlib.pyplot as plt

from minisd.datasets import to_float
from minisd.diffusion import (SD15_SCHEDULER, DDIMSampler, DDPMSampler, eps_from_prediction, make_alphas_cumprod,
                              make_betas, q_sample)
from minisd.ops.activations import softmax_forward
from minisd.testing import rel_error
from nbutil import load, show

mnist = load("mnist", "test")
rng = np.random.default_rng(0)
cfg = SD15_SCHEDULER  # SD's schedule: scaled_linear betas, no clipping of x0
abar = make_alphas_cumprod(make_betas(cfg)).astype(np.float64)  # (T,) the samplers' own float32 table

# %% [markdown]
# ## The target: the forward posterior $q(x_{t-1} \mid x_t, x_0)$
#
# The reverse of one forward step is intractable on its own ($q(x_{t-1}\mid x_t)$ depends on the whole data
# distribution), but it becomes a Gaussian once $x_0$ is known. Bayes' rule on the Gaussians of notebook 1
# (DDPM eq. 6-7) gives
#
# $$q(x_{t-1}\mid x_t, x_0) = \mathcal N\!\left(\tilde\mu_t(x_t, x_0),\; \tilde\beta_t I\right),\qquad
# \tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}\,x_0 + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\,x_t,
# \qquad \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t .$$
#
# ## Why predicting the noise gives $\mu$
#
# We do not know $x_0$ while sampling, but $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ ties it to
# the noise: $x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon)/\sqrt{\bar\alpha_t}$. Substituting into $\tilde\mu_t$,
# the $x_t$ terms collect to $1/\sqrt{\alpha_t}$ and
#
# $$\tilde\mu_t = \frac{1}{\sqrt{\alpha_t}}\left(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\epsilon\right).$$
#
# So a network $\epsilon_\theta(x_t, t)$ that predicts the noise gives the mean directly:
# $\mu_\theta = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon_\theta\big)$
# (DDPM eq. 11). This is what SD's U-Net outputs (`prediction_type="epsilon"`).
#
# minisd's `DDPMSampler.step` computes the mean the other way round, through $x_0$ (as diffusers does). Let us check
# on a real digit that both routes give the same $\mu$ when the "network" returns the true noise. Passing
# `noise=0` to `step` returns the mean itself.

# %%
%%needs_data
x0 = to_float(mnist.images[:4]).astype(np.float64)  # (4, 1, 28, 28)
eps = rng.standard_normal(x0.shape)
ddpm = DDPMSampler(cfg)  # the full chain: 999, 998, ..., 0
for t in (999, 500, 50, 1):
    xt = q_sample(x0, t, eps, abar)
    mean_sampler = ddpm.step(eps, t, xt, noise=np.zeros_like(xt))  # mu via x0 (diffusers' route)
    alpha_t = abar[t] / abar[t - 1]  # = 1 - beta_t, taken from the same table the sampler uses
    mean_eps = (xt - (1 - alpha_t) / np.sqrt(1 - abar[t]) * eps) / np.sqrt(alpha_t)  # DDPM eq. 11
    print(f"t={t:3d}: rel_error(sampler mean, eq. 11 mean) = {rel_error(mean_sampler, mean_eps):.1e}")

# %% [markdown]
# The two agree to float64 rounding. Predicting $\epsilon$, predicting $x_0$ and predicting
# $v = \sqrt{\bar\alpha_t}\epsilon - \sqrt{1-\bar\alpha_t}x_0$ (SD 2.x's 768-v models) are all equivalent
# parameterisations: given $x_t$, each one determines the others (`x0_from_prediction`,
# `eps_from_prediction`).
# They differ in how the training loss weights the noise levels (notebook 3).
#
# ## What a fixed $\Sigma$ means
#
# DDPM does not learn $\Sigma_\theta$. It fixes $\Sigma_\theta = \sigma_t^2 I$ with one of two choices, which are
# the two extremes (Ho et al. 2020, §3.2):
#
# * $\sigma_t^2 = \tilde\beta_t$, the posterior variance above: optimal if the data were a single point
#   (`variance_type="fixed_small"`, the default);
# * $\sigma_t^2 = \beta_t$: optimal if the data were $\mathcal N(0, I)$ (`"fixed_large"`).
#
# They are almost equal except at the very last steps, where $\tilde\beta_t \to 0$:

# %%
sampler = DDPMSampler(cfg)
small = np.array([sampler.get_variance(t, "fixed_small") for t in range(1000)])
large = np.array([sampler.get_variance(t, "fixed_large") for t in range(1000)])
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].plot(large, label=r"$\beta_t$ (fixed_large)")
axes[0].plot(small, label=r"$\tilde\beta_t$ (fixed_small)", ls="--")
axes[0].set(xlabel="t", title="reverse-step variance", yscale="log", ylim=(1e-5, 0.05))  # beta-tilde_0 = 0
axes[0].legend()
axes[1].plot(small / large)
axes[1].set(xlabel="t", title=r"$\tilde\beta_t / \beta_t$", ylim=(0, 1.05))
plt.tight_layout()
plt.show()

# %% [markdown]
# ## An ideal denoiser on toy data
#
# To see the reverse process work without training anything, take data whose best possible denoiser we can write
# down: a 1-D mixture of two Gaussians. The network that minimises the training loss (notebook 3) predicts the
# posterior mean of the noise, $\hat\epsilon(x_t) = \mathbb E[\epsilon \mid x_t]$, and for a Gaussian mixture that
# is closed form:
#
# * under component $k$ (weight $\pi_k$, mean $m_k$, std $s_k$), $x_t \sim \mathcal N(\sqrt{\bar\alpha_t}m_k,\ \bar\alpha_t s_k^2 + 1-\bar\alpha_t)$, which gives
#   the responsibilities $r_k(x_t) = \mathrm{softmax}_k(\log\pi_k + \log\mathcal N(x_t; \dots))$;
# * within a component, $\mathbb E[x_0\mid x_t, k] = m_k + \frac{\sqrt{\bar\alpha_t}s_k^2}{\bar\alpha_t s_k^2 + 1-\bar\alpha_t}(x_t - \sqrt{\bar\alpha_t}m_k)$;
# * $\hat x_0 = \sum_k r_k\,\mathbb E[x_0\mid x_t,k]$ and $\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\hat x_0)/\sqrt{1-\bar\alpha_t}$ (`eps_from_prediction` with `"sample"`).
#
# This function plays the role of the trained U-Net; everything else is minisd's samplers.

# %%
weights, means, stds = np.array([0.3, 0.7]), np.array([-0.6, 0.5]), np.array([0.08, 0.15])


def ideal_eps(x, t):
    """The exact E[eps | x_t] for the 1-D two-Gaussian data above. x (N, 1) -> (N, 1)."""
    a = abar[int(round(float(t)))]
    var = a * stds ** 2 + 1 - a  # (2,) variance of x_t under each component
    logp = np.log(weights) - 0.5 * np.log(var) - (x - np.sqrt(a) * means) ** 2 / (2 * var)  # (N, 2)
    r, _ = softmax_forward(logp, axis=1)  # responsibilities, (N, 2)
    x0_k = means + np.sqrt(a) * stds ** 2 / var * (x - np.sqrt(a) * means)  # (N, 2)
    x0_hat = (r * x0_k).sum(axis=1, keepdims=True)  # (N, 1)
    return eps_from_prediction(x0_hat, x, a, "sample")


def sample(sampler, steps, n=20000, seed=0):
    """Run a minisd sampler with the ideal denoiser from N(0, 1) noise -> (n,) samples."""
    g = np.random.default_rng(seed)
    sampler.set_timesteps(steps)
    x = g.standard_normal((n, 1))
    for t in sampler.timesteps:
        x = sampler.step(ideal_eps(x, t), t, x, rng=g)
    return x[:, 0]


def data_density(x):
    return sum(w / (s * np.sqrt(2 * np.pi)) * np.exp(-(x - m) ** 2 / (2 * s * s))
               for w, m, s in zip(weights, means, stds))


grid = np.linspace(-1.3, 1.3, 400)
toy = dataclasses.replace(cfg, steps_offset=0)  # 1000 steps visit t = 999 ... 0 (SD's offset 1 would start at 1000)
samplers = {"DDPM, fixed_small": lambda: DDPMSampler(toy),
            "DDPM, fixed_large": lambda: DDPMSampler(dataclasses.replace(toy, variance_type="fixed_large")),
            "DDIM (eta = 0: no noise)": lambda: DDIMSampler(toy)}
fig, axes = plt.subplots(2, 3, figsize=(11, 5), sharex=True)
for row, steps in enumerate((1000, 20)):
    for col, (name, make) in enumerate(samplers.items()):
        ax = axes[row, col]
        ax.hist(sample(make(), steps), bins=120, range=(-1.3, 1.3), density=True, alpha=0.6)
        ax.plot(grid, data_density(grid), "k", lw=1)
        ax.set_title(f"{name}, {steps} steps", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# With 1000 steps all three recover the data distribution (black curve): with many small steps the choice of
# $\sigma_t^2$ hardly matters, even though the denoiser is the same and only the injected noise differs. With 20
# steps no single Gaussian is a good model of the true reverse step any more, and the choice shows:
# `fixed_large` adds too much noise (modes too broad), `fixed_small` and DDIM (which adds none) too little (modes
# too narrow), and all three strand some samples between the modes. Improved DDPM (Nichol & Dhariwal 2021) learns
# $\Sigma_\theta$ as an interpolation between $\beta_t$ and $\tilde\beta_t$ for this reason; Stable Diffusion
# keeps it fixed and relies on samplers that integrate the same denoiser more accurately (notebook 7).
#
# ## The ideal denoiser for a finite dataset: memorisation
#
# The same recipe works for real images if the "data distribution" is a finite set of $K$ training images: then
# $\hat x_0(x_t) = \sum_k w_k\, x_0^{(k)}$ with $w = \mathrm{softmax}_k\!\left(-\|x_t - \sqrt{\bar\alpha_t}x_0^{(k)}\|^2 / 2(1-\bar\alpha_t)\right)$.
# Sampling with it, and watching its running guess $\hat x_0$ (`sampler.pred_original_sample`), shows the reverse
# process at work on real digits:

# %%
%%needs_data
train_set = to_float(mnist.images[:64]).astype(np.float64).reshape(64, -1)  # (K, 784) the whole "dataset"


def ideal_eps_images(x, t):
    """E[eps | x_t] when the data is exactly the K images above. x (N, 1, 28, 28)."""
    a = abar[int(t)]
    flat = x.reshape(len(x), -1)  # (N, 784)
    d2 = ((flat[:, None, :] - np.sqrt(a) * train_set[None]) ** 2).sum(-1)  # (N, K) squared distances
    w, _ = softmax_forward(-d2 / (2 * (1 - a)), axis=1)  # (N, K) posterior over the training images
    x0_hat = (w @ train_set).reshape(x.shape)
    return eps_from_prediction(x0_hat, x, a, "sample")


ddim = DDIMSampler(cfg)
ddim.set_timesteps(25)
x = np.random.default_rng(1).standard_normal((6, 1, 28, 28))
trajectory = []
for i, t in enumerate(ddim.timesteps):
    x = ddim.step(ideal_eps_images(x, t), t, x)
    if i % 4 == 0 or i == len(ddim.timesteps) - 1:
        trajectory.append((int(t), ddim.pred_original_sample.copy()))
cols = [pred[j] for j in range(6) for _, pred in trajectory]  # row j = sample j, left to right in time
show(cols, titles=[f"t={t}" for _ in range(6) for t, _ in trajectory], cols=len(trajectory), size=1.1,
     suptitle=r"the running guess $\hat x_0$ of six DDIM runs with the ideal denoiser")
final_guess = ddim.pred_original_sample.reshape(6, 1, -1)  # (6, 1, 784)
nearest = np.sqrt(((final_guess - train_set[None]) ** 2).sum(-1)).min(axis=1)
print("distance of each final guess to its nearest training image:", nearest.round(6))
print("(for scale: the typical distance between two training images is "
      f"{np.sqrt(((train_set[0] - train_set[1:]) ** 2).sum(-1)).mean():.1f})")

# %% [markdown]
# Early on (large $t$) the guess is a blur, the average of many training digits; as the noise drops, the softmax
# sharpens and each run commits to one training image, which it then reproduces exactly (distance 0; the last
# DDIM step of SD's schedule still leaves $\sqrt{1-\bar\alpha_0} \approx 0.03$ of noise on $x$ itself). The ideal
# denoiser of a finite dataset can only **memorise**. A neural network generalises precisely because it cannot
# represent this function exactly: its errors, smooth in $x_t$, interpolate between training images. That is the
# subject of the next notebook: training $\epsilon_\theta$.
#
# ## Summary
#
# * The reverse step is Gaussian with mean $\mu_\theta = \frac{1}{\sqrt{\alpha_t}}(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon_\theta)$: predict the noise, get the mean.
# * $\Sigma$ is fixed to $\beta_t$ or $\tilde\beta_t$; it matters little with many steps and a lot with few.
# * **Next:** [notebook 3](03_training.ipynb) trains $\epsilon_\theta$.
