# Source of notebooks/01_forward_diffusion.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 1. Forward diffusion: destroying an image, one small step at a time
#
# A diffusion model learns to *undo* a fixed noising process. This notebook is about that fixed process, the
# **forward diffusion** $q$. Nothing here is learned: it is a recipe that turns any image into pure noise in
# $T = 1000$ small steps.
#
# Each step shrinks the previous image a little and adds a little Gaussian noise:
#
# $$q(x_t \mid x_{t-1}) = \mathcal{N}\!\left(\sqrt{1-\beta_t}\,x_{t-1},\; \beta_t I\right), \qquad t = 1, \dots, T$$
#
# with a **noise schedule** $0 < \beta_1 < \dots < \beta_T < 1$. The shrink factor $\sqrt{1-\beta_t}$ is what keeps
# the variance bounded: if $x_{t-1}$ has unit variance, so does $x_t$, because $(1-\beta_t) + \beta_t = 1$.
#
# Everything below uses minisd's own code: `minisd.diffusion.schedule` builds the schedules and `q_sample` noises
# images ([source](../minisd/diffusion/schedule.py)).
#
# Run it from the `notebooks/` folder. It needs MNIST and CIFAR-10 (`minisd download mnist`,
# `minisd download cifar10`, or set `MINISD_DATA` to a folder that has them); about 30 s on a laptop CPU.

# %%
import numpy as np
import matplotlib.pyplot as plt

from minisd.diffusion import (SD15_SCHEDULER, SchedulerConfig, make_alphas_cumprod, make_betas, q_sample,
                              sigmas_from_alphas_cumprod, snr)
from minisd.datasets import to_float  # uint8 images -> float32 in [-1, 1]
from nbutil import load, show

mnist = load("mnist", "test")  # minisd.datasets.Split(images (10000, 1, 28, 28) uint8, labels (10000,))
cifar = load("cifar10", "test")  # (10000, 3, 32, 32) uint8
rng = np.random.default_rng(0)

# %% [markdown]
# ## Three noise schedules
#
# The schedule decides how fast the image is destroyed. minisd implements the three that matter
# (`make_betas`):
#
# | name | $\beta_t$ | used by |
# |---|---|---|
# | `linear` | linspace(1e-4, 0.02) | DDPM (Ho et al. 2020) |
# | `scaled_linear` | linspace($\sqrt{0.00085}$, $\sqrt{0.012}$)$^2$ | Stable Diffusion 1.x / 2.x |
# | `squaredcos_cap_v2` | from $\bar\alpha(t) = \cos^2\!\left(\frac{t/T + s}{1+s}\frac{\pi}{2}\right)$ | improved DDPM (Nichol & Dhariwal 2021) |
#
# The configs use diffusers' names (`SchedulerConfig`), so a `scheduler_config.json` from any SD checkpoint loads
# as is.

# %%
schedules = {
    "linear (DDPM)": SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear (SD)": SD15_SCHEDULER,
    "cosine (iDDPM)": SchedulerConfig(beta_schedule="squaredcos_cap_v2"),
}
betas = {name: make_betas(cfg, dtype=np.float64) for name, cfg in schedules.items()}  # (T,) each
abar = {name: make_alphas_cumprod(b) for name, b in betas.items()}  # (T,) alpha-bar, see below
t_axis = np.arange(1000)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name in schedules:
    axes[0].plot(t_axis, betas[name], label=name)
    axes[1].plot(t_axis, abar[name], label=name)
axes[0].set(title=r"$\beta_t$: noise added at step $t$", xlabel="t", yscale="log")
axes[1].set(title=r"$\bar\alpha_t = \prod_{s \leq t} (1-\beta_s)$: signal kept", xlabel="t")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The closed form: jumping straight to step $t$
#
# Applying the step $t$ times composes Gaussians, and a sum of independent Gaussians is Gaussian. With
# $\alpha_t = 1-\beta_t$ and $\bar\alpha_t = \prod_{s\le t}\alpha_s$, two steps give
#
# $$x_t = \sqrt{\alpha_t}\left(\sqrt{\alpha_{t-1}}x_{t-2} + \sqrt{1-\alpha_{t-1}}\,\epsilon_1\right) + \sqrt{1-\alpha_t}\,\epsilon_2
# = \sqrt{\alpha_t\alpha_{t-1}}\,x_{t-2} + \underbrace{\sqrt{\alpha_t(1-\alpha_{t-1}) + (1-\alpha_t)}}_{\sqrt{1-\alpha_t\alpha_{t-1}}}\,\epsilon,$$
#
# and by induction (DDPM eq. 4)
#
# $$q(x_t \mid x_0) = \mathcal{N}\!\left(\sqrt{\bar\alpha_t}\,x_0,\; (1-\bar\alpha_t) I\right)
# \quad\Longleftrightarrow\quad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\ \ \epsilon \sim \mathcal N(0, I).$$
#
# This is `q_sample(x0, t, noise, alphas_cumprod)`. It is what makes training cheap: any noise level is one
# multiply-add away, no loop over steps.
#
# Let us check it. `q_sample` with a table of the *per-step* $\alpha_t$ instead of $\bar\alpha_t$ is exactly one
# step of the chain, $\sqrt{\alpha_t}x_{t-1} + \sqrt{1-\alpha_t}\,\epsilon$. We run the chain step by step on 2000
# copies of one digit and compare the mean and spread of the result with the closed form.

# %%
%%needs_data
x0 = to_float(mnist.images[:1])  # (1, 1, 28, 28) float32 in [-1, 1]
copies = np.repeat(x0, 2000, axis=0).astype(np.float64)  # (2000, 1, 28, 28): 2000 independent chains
alphas = 1 - betas["scaled_linear (SD)"]  # per-step alpha_t, (T,)
abar_sd = abar["scaled_linear (SD)"]

x = copies
checkpoints = {}
for t in range(1000):  # t = 0 is the first step (minisd counts from 0 like diffusers)
    x = q_sample(x, t, rng.standard_normal(x.shape), alphas)  # one step of q(x_t | x_{t-1})
    if t in (99, 499, 999):
        checkpoints[t] = x.copy()

for t, xt in checkpoints.items():
    std = np.sqrt(1 - abar_sd[t])  # the closed form's standard deviation
    mean_err = np.abs(xt.mean(axis=0) - np.sqrt(abar_sd[t]) * x0[0]).max() / (std / np.sqrt(len(xt)))
    print(f"t={t:4d}  std over the 2000 chains {xt.std(axis=0).mean():.4f}  vs sqrt(1 - abar_t) = {std:.4f};  "
          f"worst pixel mean vs sqrt(abar_t) x0: {mean_err:.1f} standard errors")

# %% [markdown]
# The chain and the closed form agree: the spread matches to three digits, and the mean differs only by the
# Monte-Carlo error of 2000 samples (the worst of 784 pixels is expected around 3-4 standard errors away).
#
# ## Real images at growing $t$
#
# Here is what the model sees during training: the same image at different noise levels, under SD's schedule.
# Pixels are in $[-1, 1]$; the noisy images are clipped to that range for display only.

# %%
%%needs_data
ts = [0, 50, 100, 200, 300, 500, 700, 999]
eps_mnist = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
eps_cifar = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
abar_sd32 = make_alphas_cumprod(make_betas(SD15_SCHEDULER))  # float32, as the library uses it
row_mnist = [q_sample(to_float(mnist.images[[3]]), t, eps_mnist, abar_sd32)[0] for t in ts]
row_cifar = [q_sample(to_float(cifar.images[[7]]), t, eps_cifar, abar_sd32)[0] for t in ts]
titles = [f"t={t}\nabar={abar_sd32[t]:.3f}" for t in ts]
show(row_mnist, titles=titles, suptitle="MNIST, SD schedule (same noise at every t)")
show(row_cifar, titles=titles, suptitle="CIFAR-10, SD schedule")

# %% [markdown]
# Using the **same** $\epsilon$ at every $t$ shows what $q$ does: the picture fades linearly in
# $\sqrt{\bar\alpha_t}$ while the same noise pattern fades in. The digit survives longer than the CIFAR image's fine
# texture: high-contrast, large structures are the last to go, fine detail the first.
#
# ## Comparing the schedules on one image

# %%
%%needs_data
x0c = to_float(cifar.images[[7]]).astype(np.float64)
eps = rng.standard_normal(x0c.shape)
ts = [0, 100, 250, 400, 550, 700, 850, 999]
for name in schedules:
    show([q_sample(x0c, t, eps, abar[name])[0] for t in ts], titles=[f"t={t}" for t in ts], suptitle=name,
         size=1.3)

# %% [markdown]
# The linear schedule destroys the image by $t \approx 400$ and spends the remaining 60% of its steps on
# near-pure noise. The cosine schedule was designed to fix exactly that (Nichol & Dhariwal 2021, fig. 3); SD's
# scaled-linear sits in between, and SD works on 64x64 latents, not on these 32x32 pixels.
#
# ## Signal-to-noise ratio
#
# The one number that describes a noise level is the **signal-to-noise ratio**
#
# $$\mathrm{SNR}(t) = \frac{\bar\alpha_t}{1-\bar\alpha_t},$$
#
# the ratio of the variance of the signal part $\sqrt{\bar\alpha_t}x_0$ to that of the noise part (for
# unit-variance data). Two schedules with the same SNR at some step produce statistically identical $x_t$ there;
# a schedule is really just a way of spending $T$ steps along the $\log \mathrm{SNR}$ axis.
# `snr(alphas_cumprod)` computes it.

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name in schedules:
    ax.plot(t_axis, np.log10(snr(abar[name])), label=name)
ax.axhline(0, color="grey", lw=0.8, ls="--")
ax.text(5, 0.15, "SNR = 1", color="grey", fontsize=8)
ax.set(xlabel="t", ylabel=r"$\log_{10}$ SNR(t)", title="signal-to-noise ratio against t")
ax.legend()
plt.tight_layout()
plt.show()
for name in schedules:
    s = snr(abar[name])
    print(f"{name:20s} SNR(0) = {s[0]:9.1f}   SNR(999) = {s[-1]:.2e}   SNR = 1 at t = {np.argmin(np.abs(s - 1))}")

# %% [markdown]
# Two things to notice:
#
# * **SD's last step is not pure noise.** $\mathrm{SNR}(999) \approx 0.0047$: $\sqrt{\bar\alpha_{999}} \approx 0.068$
#   of the image is still there. Sampling starts from pure noise anyway, a small train/test mismatch (Lin et al.
#   2023, "Common diffusion noise schedules and sample steps are flawed", which adds a zero-terminal-SNR
#   rescaling).
# * The cosine schedule caps $\beta_t$ at 0.999, so its final SNR is tiny but not zero either.
#
# ## The same thing in "sigma" form
#
# Dividing $x_t$ by $\sqrt{\bar\alpha_t}$ gives $x_t/\sqrt{\bar\alpha_t} = x_0 + \sigma_t\,\epsilon$ with
# $\sigma_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t} = 1/\sqrt{\mathrm{SNR}}$: the image plus noise of standard
# deviation $\sigma_t$, no shrinking. This "variance-exploding" view is what the Euler and DPM++ samplers integrate
# (notebook 7). For SD, $\sigma$ runs from 0.029 to 14.6:

# %%
sig = sigmas_from_alphas_cumprod(abar["scaled_linear (SD)"])
print(f"SD sigmas: t=0 {sig[0]:.4f}, t=500 {sig[500]:.3f}, t=999 {sig[999]:.2f};"
      f"  equal to 1/sqrt(SNR): {np.allclose(sig, 1 / np.sqrt(snr(abar['scaled_linear (SD)'])))}")

# %% [markdown]
# ## Summary
#
# * $q(x_t\mid x_{t-1})$ adds a little noise per step; $q(x_t \mid x_0)$ jumps to any step in closed form with
#   $\bar\alpha_t$, which is what training uses (`q_sample`).
# * A schedule is a path through SNR, from $10^{3}$-$10^{4}$ (clean) down to $10^{-2}$ or less (noise).
# * **Next:** [notebook 2](02_denoising.ipynb) runs the process backwards.
