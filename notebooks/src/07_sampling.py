# Source of notebooks/07_sampling.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 7. Sampling: DDPM, DDIM, Euler, DPM++ and classifier-free guidance
#
# A trained noise predictor $\epsilon_\theta$ defines the reverse process; a **sampler** decides how to walk it in a
# small number of steps. All samplers here call the same network and differ only in how they turn its predictions
# into the next $x$:
#
# | sampler | update | notes |
# |---|---|---|
# | DDPM (`ddpm`) | posterior mean + fresh noise $\sigma_t z$ (notebook 2) | stochastic, made for 1000 steps |
# | DDIM (`ddim`, $\eta = 0$) | jump to $\sqrt{\bar\alpha_{t'}}\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\epsilon$ | deterministic; SD's original default |
# | Euler (`euler`) | one Euler step of $dx/d\sigma = (x - \hat x_0)/\sigma$ in "sigma space" (notebook 1) | deterministic ODE solver |
# | DPM++ 2M (`dpmpp_2m`) | exact integration of the linear part + 2nd-order multistep on $\hat x_0$ | deterministic; the usual choice at 20-30 steps |
#
# All come from [`minisd/diffusion`](../minisd/diffusion/) (`make_sampler`), checked step by step against
# diffusers' schedulers in `tests/test_samplers.py`, and run here through minisd's `txt2img` pipeline with the tiny
# text-conditioned MNIST model that ships with minisd. About 1-2 minutes; needs only the default model.

# %%
import dataclasses

import numpy as np
import matplotlib.pyplot as plt

from minisd import pipeline
from minisd.diffusion import make_sampler
from minisd.image import from_pil
from minisd.train.checkpoints import load_model_file
from minisd.train.data import eval_images
from minisd.train.evaluate import find_classifier
from nbutil import load_default_model, model_path, show, show_grid

model = load_default_model()
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
prompts = [f"a handwritten {d}" for d in DIGITS]


def images_of(result):
    """A pipeline Result's PIL images -> float array (N, 3, H, W) in [-1, 1]."""
    return np.concatenate([from_pil(im) for im in result.images])

# %% [markdown]
# ## Four samplers at equal step counts
#
# One prompt per digit, the same seed (so the same initial noise) for every sampler, guidance 3 (the default
# model's training recipe):

# %%
%%needs_model
samplers = ("ddpm", "ddim", "euler", "dpmpp_2m")
for steps in (5, 10, 25):
    rows = [images_of(pipeline.txt2img(model, prompts, steps=steps, sampler=name, guidance=3.0, seed=0,
                                       progress=False)) for name in samplers]
    show_grid(np.concatenate(rows), cols=10, row_labels=samplers, title=f"{steps} steps")

# %% [markdown]
# For this small model and simple data all four already draw clean digits at 5 steps. The three deterministic
# samplers give nearly the same image for each digit: they are three discretisations of the same **probability-flow
# ODE**, integrated from the same starting noise. DDPM draws fresh noise at every step, so its images differ in
# the details. How close to the exact ODE solution each deterministic sampler gets is easier to see in numbers: run
# each at $S$ steps and measure the distance of the final latents to the same sampler's 100-step result. All start
# from the same noise at $t = 999$ (`timestep_spacing="trailing"`, see below), and we drive minisd's own sampling
# loop, `pipeline.denoise`, directly.

# %%
%%needs_model
config = dataclasses.replace(model.scheduler, timestep_spacing="trailing")  # every run starts at t = 999
context = pipeline.encode_prompts(model, prompts, [""] * len(prompts), 1, cfg=True)  # (20, 77, D): [uncond; cond]
noise = np.random.default_rng(0).standard_normal((10, 4, model.sample_size, model.sample_size), dtype=np.float32)


def final_latents(name, steps):
    sampler = make_sampler(name, config)
    sampler.set_timesteps(steps)
    start = noise * np.float32(sampler.init_noise_sigma)
    return pipeline.denoise(model, sampler, start, sampler.timesteps, context, guidance=3.0, progress=False)


fig, ax = plt.subplots(figsize=(6, 3.5))
step_counts = (4, 8, 16, 32)
for name in ("ddim", "euler", "dpmpp_2m"):
    reference = final_latents(name, 100)
    errors = [np.sqrt(np.mean((final_latents(name, s) - reference) ** 2)) for s in step_counts]
    ax.loglog(step_counts, errors, "o-", label=name)
ax.loglog(step_counts, [0.5 / s for s in step_counts], "k:", lw=1, label="1 / S (first order)")
ax.set(xlabel="steps S", ylabel="RMS distance to its 100-step result", title="convergence of the ODE samplers")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# All three converge steadily: doubling the steps roughly halves the distance. DDIM and Euler are first-order
# methods; DPM++ 2M is second order in theory and has the smallest error at 4-8 steps, but on this model it does
# not show a steeper slope. Convergence orders are asymptotic statements about smooth problems; at 4-32 steps of a
# learned, guided denoiser the behaviour is still pre-asymptotic (we measured the same with guidance off and with
# the final step ending at $\sigma_\text{min}$ instead of 0). What matters in practice is the error at the step
# counts people use, which is where DPM++ 2M is ahead. DDPM is left out: it is stochastic, its samples do not
# converge to one image.
#
# (Why `trailing`? SD's own setting, `leading` with `steps_offset=1`, starts each sampler at a different noise
# level depending on the step count: DDIM at $t = 981$ for 50 steps, DPM++ at $t = 801$ for 200 steps but
# $t = 961$ for 64, because diffusers' DPM-Solver spaces $S+1$ points. Runs with different step counts then
# integrate from different starting points and cannot converge to one another; Lin et al. 2023 discuss this flaw.)
#
# ## Classifier-free guidance
#
# The model was trained with 10% of captions replaced by the empty prompt, so it knows both
# $\epsilon_\theta(x_t, c)$ and $\epsilon_\theta(x_t, \varnothing)$. At each step the pipeline runs both (one batch of
# 2N) and extrapolates (Ho & Salimans 2022):
#
# $$\hat\epsilon = \epsilon_\theta(x_t,\varnothing) + w\,\big(\epsilon_\theta(x_t, c) - \epsilon_\theta(x_t,\varnothing)\big)$$
#
# ($w = 1$ is the plain conditional model; `pipeline.guide` is this line). Larger $w$ follows the prompt harder, at a
# cost in diversity and, eventually, image quality. The default model ships with the small MNIST classifier minisd
# trained for evaluation, so we can *measure* prompt adherence: the share of samples it reads as the digit asked for.

# %%
%%needs_model
classifier, _, _ = find_classifier("mnist", model_file=load_model_file(model_path()))
labels = np.repeat(np.arange(10), 5)
many = [p for p in prompts for _ in range(5)]  # 5 samples per digit
scales = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)
accuracy, spread, shown = [], [], []
for w in scales:
    x = images_of(pipeline.txt2img(model, many, steps=20, sampler="dpmpp_2m", guidance=w, seed=1, progress=False))
    logits, _ = classifier.predict(eval_images(x, (1, 28, 28)))
    accuracy.append(float((logits.argmax(axis=1) == labels).mean()))
    spread.append(float(np.mean([x[labels == k].std(axis=0).mean() for k in range(10)])))  # within-digit variety
    shown.append(x[::5])  # the first sample of every digit
show_grid(np.concatenate(shown), cols=10, row_labels=[f"w={w:g}" for w in scales],
          title="guidance scale w (DPM++ 2M, 20 steps, same seed)")
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(scales, accuracy, "o-")
axes[0].set(xlabel="guidance w", ylabel="classifier accuracy", title="prompt adherence (50 samples)", ylim=(0, 1.05))
axes[1].plot(scales, spread, "o-", color="tab:orange")
axes[1].set(xlabel="guidance w", ylabel="mean pixel std within a digit", title="diversity")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## The trajectory of $x_0$ predictions
#
# At every step the sampler's network output implies a guess of the final image, $\hat x_0 = (x_t -
# \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$ (`sampler.pred_original_sample`). Decoding those guesses
# shows what the sampler "believes" along the way; decoding $x_t$ itself shows what it holds. We run the pipeline's
# own loop (`pipeline.denoise`) with a callback that records both.

# %%
%%needs_model
sampler = make_sampler("ddim", model.scheduler)
sampler.set_timesteps(20)
context = pipeline.encode_prompts(model, prompts[3:4] * 2, [""] * 2, 1, cfg=True)  # 2 samples of "three"
latents = np.random.default_rng(3).standard_normal((2, 4, model.sample_size, model.sample_size), dtype=np.float32)
latents *= np.float32(sampler.init_noise_sigma)
record = []
pipeline.denoise(model, sampler, latents, sampler.timesteps, context, guidance=3.0, progress=False,
                 callback=lambda i, t, x: record.append((int(t), x.copy(), sampler.pred_original_sample.copy())))
picked = [record[i] for i in (0, 2, 4, 7, 10, 14, 19)]
titles = [f"t={t}" for t, _, _ in picked]
for j in range(2):
    xt = np.stack([x[j] for _, x, _ in picked])
    x0 = np.stack([p[j] for _, _, p in picked])
    show(np.clip(np.concatenate([pipeline.decode(model, xt), pipeline.decode(model, x0)]), -1, 1), cols=len(picked),
         titles=titles + [""] * len(picked), size=1.2,
         suptitle=f"sample {j + 1}: top, decoded $x_t$ after each step; bottom, decoded prediction $\\hat x_0$")

# %% [markdown]
# The $\hat x_0$ row settles early: after the first steps the digit's identity and shape are fixed, and the
# remaining steps only refine strokes. The decoded $x_t$ row starts as the decoder's reading of almost pure latent
# noise (scattered stroke fragments: the decoder only knows how to draw strokes) and turns into the digit as the
# noise is removed. Coarse structure first, detail last: the SNR picture of notebook 1, seen from the sampler's side.
#
# ## Summary
#
# * Same network, different integrators: DDPM (stochastic), DDIM and Euler (first order), DPM++ 2M (second order).
# * Guidance $w$ trades diversity for adherence; measured here with a classifier.
# * **Next:** [notebook 8](08_kernels.ipynb), the CUDA kernels, and [notebook 9](09_verifying.ipynb), checking
#   minisd against diffusers.
