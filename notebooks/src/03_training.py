# Source of notebooks/03_training.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 3. The loss, and training a tiny model live
#
# [Notebook 2](02_denoising.ipynb) showed that a noise predictor $\epsilon_\theta(x_t, t)$ is all the reverse
# process needs. Here we derive the loss that trains it, train a small U-Net on MNIST for a few minutes with
# minisd's hand-written backward passes, and look at where each of those backward passes comes from.
#
# Needs MNIST (`minisd download mnist`, or `MINISD_DATA`). About 3 minutes on a laptop CPU, most of it training.

# %%
import time

import numpy as np
import matplotlib.pyplot as plt

from minisd.datasets import to_float
from minisd.diffusion import (SchedulerConfig, make_alphas_cumprod, make_betas, q_sample, sample_timesteps,
                              training_target)
from minisd.models.unet import UNet, UNetConfig
from minisd.ops.loss import mse_loss_backward, mse_loss_forward
from minisd.optim import EMA, AdamW, clip_grad_norm, lr_warmup_cosine
from minisd.testing import numerical_gradient, rel_error
from minisd.train.sampling import denoiser, generate
from nbutil import load, show_grid

train = load("mnist", "train")  # 60,000 digits, (60000, 1, 28, 28) uint8

# %% [markdown]
# ## From the likelihood bound to $L_\text{simple}$
#
# Diffusion models are trained by maximising a variational lower bound on $\log p_\theta(x_0)$. For the Gaussian
# chains of notebooks 1-2 the bound splits into one term per step, each a KL divergence between two Gaussians
# with the same fixed variance $\sigma_t^2$ (DDPM eq. 5, 8):
#
# $$L_{t-1} = \mathbb E_q\, D_\text{KL}\!\left(q(x_{t-1}\mid x_t,x_0)\,\|\,p_\theta(x_{t-1}\mid x_t)\right)
# = \mathbb E_q \frac{1}{2\sigma_t^2}\left\|\tilde\mu_t(x_t,x_0) - \mu_\theta(x_t,t)\right\|^2 + C .$$
#
# Both means have the form $\frac{1}{\sqrt{\alpha_t}}(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\,\cdot)$, one with
# the true $\epsilon$ and one with $\epsilon_\theta$, so the difference is just a scaled noise error:
#
# $$L_{t-1} = \mathbb E_{x_0,\epsilon}\left[\underbrace{\frac{\beta_t^2}{2\sigma_t^2\,\alpha_t\,(1-\bar\alpha_t)}}_{\lambda_t}
# \left\|\epsilon - \epsilon_\theta\!\left(\sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon,\ t\right)\right\|^2\right].$$
#
# Ho et al. found that **dropping** $\lambda_t$ and sampling $t$ uniformly trains better (DDPM eq. 14):
#
# $$L_\text{simple} = \mathbb E_{t \sim U\{1..T\},\ x_0,\ \epsilon \sim \mathcal N(0,I)}\ \left\|\epsilon - \epsilon_\theta(x_t, t)\right\|^2 .$$
#
# Here is the weight it drops, for the DDPM schedule with $\sigma_t^2 = \tilde\beta_t$:

# %%
scheduler = SchedulerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)  # DDPM
betas = make_betas(scheduler, dtype=np.float64)
abar = make_alphas_cumprod(betas)
abar_prev = np.concatenate([[1.0], abar[:-1]])
sigma2 = (1 - abar_prev) / (1 - abar) * betas  # beta-tilde (fixed_small)
lam = betas[1:] ** 2 / (2 * sigma2[1:] * (1 - betas[1:]) * (1 - abar[1:]))  # t = 1..T-1 (sigma2 is 0 at t = 0)
plt.figure(figsize=(6, 3))
plt.plot(np.arange(1, 1000), lam)
plt.yscale("log")
plt.xlabel("t")
plt.title(r"ELBO weight $\lambda_t$ that $L_\mathrm{simple}$ replaces by 1")
plt.tight_layout()
plt.show()

# %% [markdown]
# The bound weights the almost-clean steps (small $t$) up to 100 times more than the middle ones. Those steps
# remove invisible amounts of noise; dropping the weight moves the model's effort to the larger $t$, where the
# structure of the image is decided. $L_\text{simple}$ is a plain mean squared error, `minisd.ops.loss.mse_loss_forward`,
# whose backward is $\partial L/\partial \epsilon_\theta = \frac{2}{n}(\epsilon_\theta - \epsilon)$.
#
# ## One training step
#
# Everything a step does is a call into minisd:
#
# 1. $t \sim U\{0..T-1\}$ per image (`sample_timesteps`), $\epsilon \sim \mathcal N(0,I)$, $x_t$ = `q_sample(x0, t, eps)`;
# 2. `unet.forward(x_t, t, y=labels, keep_cache=True)`: the output and the cache of every layer;
# 3. `mse_loss_forward(out, eps)`, then `mse_loss_backward` gives $\partial L/\partial\,\text{out}$;
# 4. `unet.backward(dout, cache)` walks the layers in reverse and leaves every parameter's gradient in
#    `unet.params.grads`;
# 5. `clip_grad_norm`, `AdamW.step` with a warmup + cosine learning rate, and an exponential moving average of the
#    weights (`EMA`) that we sample from.
#
# The model is a small class-conditional U-Net (the same `UNet` class as SD 1.5, 3000x smaller): it is told which
# digit to draw through a label embedding added to the timestep embedding. 10% of the labels are replaced by an
# 11th "no label" class, so the same network also learns the unconditional model, which classifier-free
# guidance needs when sampling (notebook 7).
#
# To get recognisable digits within a couple of minutes on a CPU, we train on MNIST **downsampled to 14x14** (2x2
# average pooling): a quarter of the pixels, so four times as many images per second. Nothing else changes; the
# recipe `minisd train --recipe mnist_ddpm` runs the same loop at 28x28 for longer.

# %%
STEPS = 400  # optimizer steps: about 2 minutes on a laptop
BATCH = 64
SNAPSHOTS = (0, 50, 150, 400)  # steps at which we draw samples
SIDE = 14  # image side after 2x2 average pooling

cfg = UNetConfig(in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,),
                 num_res_blocks=1, num_heads=4, context_dim=None, num_classes=11, norm_num_groups=8)
unet = UNet(cfg, rng=np.random.default_rng(0))
print(f"U-Net: {unet.num_parameters():,} parameters (SD 1.5: 859,520,964)")
alphas_cumprod = make_alphas_cumprod(make_betas(scheduler))  # (T,) float32, as the model trains in float32
opt = AdamW(unet.params, lr=2e-3, weight_decay=0.0)
ema = EMA(unet.params, decay=0.99)
NULL_CLASS = 10


def training_step(x0, labels, rng):
    """One step of L_simple on a batch x0 (N, 1, 14, 14) in [-1, 1]. Returns the loss."""
    t = sample_timesteps(rng, len(x0), scheduler.num_train_timesteps)  # (N,)
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = q_sample(x0, t, eps, alphas_cumprod)
    labels = np.where(rng.random(len(labels)) < 0.1, NULL_CLASS, labels)  # label dropout, for guidance
    out, cache = unet.forward(x_t, t, y=labels, keep_cache=True)
    loss, loss_cache = mse_loss_forward(out, training_target(x0, eps, t, "epsilon", alphas_cumprod))
    unet.params.zero_grad()
    unet.backward(mse_loss_backward(1.0, loss_cache), cache)
    clip_grad_norm(unet.params, 1.0)
    opt.step(lr=lr_warmup_cosine(opt.t, 2e-3, 20, STEPS, min_lr=1e-5))
    ema.update()
    return float(loss)


def samples(seed=0):
    """Two samples of every digit from the EMA weights: DDPM, 20 steps, guidance 3. -> (20, 1, 14, 14).
    Ancestral DDPM sampling is much more forgiving of an undertrained model than deterministic DDIM, which
    carries the model's errors at low noise levels through to the final image."""
    labels = np.repeat(np.arange(10), 2)
    ema.swap()  # sample with the averaged weights, then swap the live ones back
    try:
        model = denoiser(unet, labels, np.full_like(labels, NULL_CLASS), guidance=3.0, by="y")
        return generate(model, scheduler, (20, 1, SIDE, SIDE), np.random.default_rng(seed), "ddpm", 20)
    finally:
        ema.swap()

# %% [markdown]
# ## Training, live
#
# The loss printed is $L_\text{simple}$ averaged over the last 25 steps. It starts near 1 (predicting
# $\epsilon_\theta = 0$ gives the variance of the noise) and falls quickly: most of the noise at large $t$ is easy
# to predict, because $x_t$ *is* mostly noise there.

# %%
%%needs_data
rng = np.random.default_rng(0)
images = to_float(train.images).reshape(-1, 1, SIDE, 2, SIDE, 2).mean(axis=(3, 5))  # (60000, 1, 14, 14) in [-1, 1]
losses, grids = [], {}
start = time.perf_counter()
for step in range(STEPS + 1):
    if step in SNAPSHOTS:
        grids[step] = samples()
    if step == STEPS:
        break
    idx = rng.integers(0, len(images), BATCH)
    losses.append(training_step(images[idx], train.labels[idx], rng))
    if (step + 1) % 25 == 0:
        print(f"step {step + 1:4d}  loss {np.mean(losses[-25:]):.4f}  ({time.perf_counter() - start:.0f} s)")

# %%
%%needs_data
plt.figure(figsize=(6, 3))
plt.plot(losses, alpha=0.4, label="per step")
plt.plot(np.arange(24, len(losses)), np.convolve(losses, np.ones(25) / 25, "valid"), label="mean of 25")
plt.yscale("log")
plt.xlabel("step")
plt.ylabel(r"$L_\mathrm{simple}$")
plt.legend()
plt.tight_layout()
plt.show()
for step, grid in grids.items():
    show_grid(grid, cols=10, title=f"after {step} steps (two samples per digit 0-9)")

# %% [markdown]
# At step 0 the U-Net outputs exactly zero (SD zero-initialises the output conv and the last layer of every
# residual branch, so the untrained network predicts "no noise") and the sampler returns its starting noise,
# clipped. After 50 steps blobs appear, after 150 strokes, and by 400 steps every digit is recognisable (at 14x14).
# The recipe `minisd train --recipe mnist_ddpm` runs this same loop at 28x28 with a larger model for longer; see
# docs/training.md.
#
# ## Where the backward pass of each layer comes from
#
# There is no autograd in minisd. `UNet.forward` calls each block's forward in order and keeps its cache;
# `UNet.backward` walks the caches in reverse ("reverse order of forward") and each block's backward calls the
# backward of its ops. Every op is a pair of pure functions, `op_forward(...) -> (y, cache)` and
# `op_backward(dy, cache) -> grads`, derived by hand:
#
# | layer in the U-Net | op pair | derivation |
# |---|---|---|
# | every 3x3 / 1x1 conv, down/upsampling | `conv2d_forward/backward` ([conv.py](../minisd/ops/conv.py)) | [docs/backward_conv.md](../docs/backward_conv.md) |
# | ResBlock and SpatialTransformer norms | `group_norm_forward/backward` ([norm.py](../minisd/ops/norm.py)) | [docs/backward_groupnorm.md](../docs/backward_groupnorm.md) |
# | transformer pre-norms | `layer_norm_forward/backward` ([norm.py](../minisd/ops/norm.py)) | [docs/backward_layernorm.md](../docs/backward_layernorm.md) |
# | self- and cross-attention | `attention_forward/backward` ([attention.py](../minisd/ops/attention.py)) | [docs/backward_attention.md](../docs/backward_attention.md) |
# | feed-forward | `geglu_forward/backward` ([activations.py](../minisd/ops/activations.py)) | [docs/backward_geglu.md](../docs/backward_geglu.md) |
# | projections, time MLP | `linear_forward/backward` ([linear.py](../minisd/ops/linear.py)): $dx = dy\,W$, $dW = dy^\top x$, $db = \sum dy$ | |
# | SiLU, label embedding | `silu_*`, `embedding_*` | |
#
# The order in which gradients arrive shows the reverse walk: the output conv first, the timestep MLP last (it
# receives the sum of what every ResBlock sent back).

# %%
arrived = list(unet.params.grads)  # Params.add_grad keeps first-arrival order
short = [name.removeprefix("model.diffusion_model.") for name in arrived]
print(f"{len(short)} parameter gradients. First to arrive:", *short[:5], sep="\n  ")
print("... last to arrive:", *short[-4:], sep="\n  ")

# %% [markdown]
# Each of those backward passes is tested against PyTorch and against central differences
# (`tests/test_ops_*.py`, `tests/test_model_unet.py`). We can repeat the central-difference check here on a whole
# U-Net in float64: perturb a few weights of each kind of layer by $\pm h$, rerun the forward, and compare
# $\frac{f(w+h) - f(w-h)}{2h}$ with what `unet.backward` returned. `minisd.testing.numerical_gradient` does the
# perturbing; `rel_error` is $\max|a-b| / \max|b|$.

# %%
small = UNetConfig(in_channels=1, out_channels=1, model_channels=8, channel_mult=(1, 2), attention_resolutions=(2,),
                   num_res_blocks=1, num_heads=2, context_dim=None, num_classes=3, norm_num_groups=4)
check = UNet(small, rng=np.random.default_rng(1), dtype=np.float64)
g = np.random.default_rng(2)
for name, w in check.params.data.items():  # un-zero the zero-initialised layers, or most gradients would be 0
    if not w.any():
        w[...] = 0.1 * g.standard_normal(w.shape)
x = g.standard_normal((2, 1, 8, 8))
t, y = np.array([10, 700]), np.array([0, 2])
dout = g.standard_normal((2, 1, 8, 8))
out, cache = check.forward(x, t, y=y, keep_cache=True)
check.backward(dout, cache)

p = "model.diffusion_model."
cases = {"conv (ResBlock in_layers.2)": "input_blocks.1.0.in_layers.2.weight",
         "GroupNorm gamma": "input_blocks.1.0.in_layers.0.weight",
         "LayerNorm gamma (norm1)": "input_blocks.3.1.transformer_blocks.0.norm1.weight",
         "attention to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
         "GEGLU input projection": "input_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight",
         "timestep MLP": "time_embed.0.weight",
         "label embedding": "label_emb.weight"}
for what, name in cases.items():
    w = check.params.data[p + name]
    entries = w.reshape(-1)[:12]  # a view: numerical_gradient perturbs these entries in place
    num = numerical_gradient(lambda: check.forward(x, t, y=y)[0], entries, dout)
    ana = check.params.grads[p + name].reshape(-1)[:12]
    print(f"{what:28s} rel_error(backward, central differences) = {rel_error(ana, num):.1e}")

# %% [markdown]
# Agreement to $10^{-7}$ or better through every kind of layer, in one whole network (central differences with
# $h = 10^{-6}$ are only about that accurate on small gradients; the project's tests require $< 10^{-6}$): the
# hand-written backward passes compose correctly.
#
# ## Summary
#
# * $L_\text{simple}$ is the ELBO with its per-step weights dropped: a plain MSE on the noise.
# * A training step is `q_sample` -> `forward` -> MSE -> `backward` -> AdamW, all of it minisd's own code.
# * **Next:** [notebook 4](04_unet.ipynb) opens the U-Net.
