# Source of notebooks/04_unet.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 4. The U-Net, block by block
#
# The network $\epsilon_\theta(x_t, t, c)$ of Stable Diffusion is a U-Net: it takes the noisy latents (4 channels
# at 64x64 for a 512x512 image), the timestep $t$ and the text embeddings $c$ (77 tokens x 768), and returns a
# tensor of the latents' shape, the predicted noise. This notebook opens it: the block plan, the shapes through
# every block, the skip connections, the timestep embedding, and the two kinds of attention.
#
# All of it is minisd's `minisd/models/unet.py` ([source](../minisd/models/unet.py)), whose parameter names are the
# original checkpoint's (`model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`). No
# data is needed; about 30 s on a laptop CPU.

# %%
import dataclasses
from collections import Counter

import numpy as np
import matplotlib.pyplot as plt

from minisd.models.unet import PREFIX, SD15, UNet, build_plan, param_shapes
from minisd.ops.timestep import timestep_embedding

print(SD15)
shapes = param_shapes(SD15)
print(f"\nSD 1.5 U-Net: {len(shapes)} tensors, {sum(np.prod(s) for s in shapes.values()):,} parameters")

# %% [markdown]
# The parameter count is computed from the config alone and matches the published 859,520,964. The config fields
# are the names of LDM's `v1-inference.yaml` (`model_channels: 320`, `channel_mult: [1, 2, 4, 4]`, ...).
#
# ## The block plan
#
# `build_plan` derives the list of layers from the config exactly as LDM's `UNetModel.__init__` builds its
# `ModuleList`s. Four resolution levels on the way down (`input_blocks`), a `middle_block`, four levels on the way
# up (`output_blocks`). Each level has ResBlocks ("res") and, at the three highest resolutions, a
# SpatialTransformer ("st", self- and cross-attention); levels are joined by a stride-2 conv ("down") or nearest
# upsampling + conv ("up").

# %%
plan = build_plan(SD15)
side = 64  # latent side for a 512x512 image
rows = []
for part, blocks in (("input_blocks", plan.input_blocks), ("middle_block", [plan.middle]),
                     ("output_blocks", plan.output_blocks)):
    for i, block in enumerate(blocks):
        for layer in block:
            if layer.kind == "up":
                side *= 2
            elif layer.kind == "down":
                side //= 2
            n_params = sum(np.prod(s) for k, s in shapes.items() if k.startswith(PREFIX + layer.name + "."))
            extra = f"{layer.heads} heads x {layer.dhead}" if layer.kind == "st" else ""
            rows.append((layer.name, layer.kind, f"{layer.cin} -> {layer.cout}", f"{side}x{side}", extra, n_params))
print(f"{'layer':22s} {'kind':5s} {'channels':>12s} {'out size':>9s} {'attention':>14s} {'parameters':>12s}")
for r in rows:
    print(f"{r[0]:22s} {r[1]:5s} {r[2]:>12s} {r[3]:>9s} {r[4]:>14s} {r[5]:>12,}")

# %% [markdown]
# ## Tracing shapes through every block
#
# The real SD 1.5 U-Net has 860M parameters (3.4 GB in float32). To trace it at full size in seconds we build the
# **same architecture at one tenth of the width** (`model_channels=32` instead of 320: same levels, same depths,
# same 8 heads, same 768-wide text input, same 64x64 latents) and run it with the `trace` callback every minisd
# model has: `trace(name, array)` is called with each block's output. (`minisd verify`, notebook 9, uses the same
# callback to compare minisd with diffusers block by block.)

# %%
narrow = dataclasses.replace(SD15, model_channels=32)  # SD 1.5 at 1/10 width: channels 32/64/128/128
unet = UNet(narrow, rng=np.random.default_rng(0))
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)  # latents: batch 2 (SD runs [uncond, cond] together)
t = np.array([981, 981])  # the first timestep of a 50-step SD sampler
context = rng.standard_normal((2, 77, 768)).astype(np.float32)  # stands in for the CLIP text embeddings

traced = {}
out, cache = unet.forward(x, t, context, keep_cache=True, trace=lambda name, a: traced.setdefault(name, a.shape))
for name, shape in traced.items():
    full = shape if name == "out" else (shape[0], shape[1] * 10) + shape[2:]  # what the 320-wide SD 1.5 gives
    print(f"{name:18s} traced {str(shape):20s} SD 1.5: {full}")

# %% [markdown]
# Every shape matches the full model with channels divided by 10 (the output keeps its 4 channels). The spatial
# size halves three times, 64 -> 32 -> 16 -> 8, while the channels grow 320 -> 640 -> 1280: the network trades
# resolution for features, then trades them back.
#
# ## Skip connections: the "U"
#
# Every input block pushes its output onto a stack; every output block pops one and **concatenates** it with its
# own input along the channels, `[h, skip]` with `h` first (LDM's `th.cat([h, hs.pop()], dim=1)`). So
# `output_blocks.i` reads the output of `input_blocks.(11 - i)`, at the same resolution. The first ResBlock of each
# output block therefore takes more channels than it produces (e.g. 2560 -> 1280) and has a 1x1-conv
# `skip_connection` of its own to match widths.

# %%
n_in = len(plan.input_blocks)
fig, ax = plt.subplots(figsize=(11, 3.6))
level = {}
for i in range(n_in):
    level[f"input_blocks.{i}"] = (i, -int(np.log2(64 // traced[f"input_blocks.{i}"][2])))
level["middle_block"] = (n_in, -3.6)
for i, block in enumerate(plan.output_blocks):  # placed at the resolution where the skip is concatenated (the
    side_in = traced[f"output_blocks.{i}"][2] // (2 if block[-1].kind == "up" else 1)  # input, before any "up")
    level[f"output_blocks.{i}"] = (n_in + 1 + i, -int(np.log2(64 // side_in)))
for i in range(len(plan.output_blocks)):  # skips: input_blocks.(11 - i) -> output_blocks.i, same resolution
    (x0, y0), (x1, y1) = level[f"input_blocks.{n_in - 1 - i}"], level[f"output_blocks.{i}"]
    lift = 0.12 + 0.09 * (i % 3)  # three skips per level: stack them so they do not overlap
    ax.annotate("", (x1, y1 + lift), (x0, y0 + lift), arrowprops=dict(arrowstyle="->", color="tab:orange", lw=1))
names = list(level)
ax.plot([level[n][0] for n in names], [level[n][1] for n in names], "-", color="grey", lw=1)
for n in names:
    xx, yy = level[n]
    ax.scatter(xx, yy, s=90, color="tab:blue" if n.startswith("input") else "tab:green" if n.startswith("output")
               else "tab:red", zorder=3)
    ax.text(xx, yy - 0.35, str(traced[n][1] * 10), ha="center", fontsize=7)
ax.set_yticks([0, -1, -2, -3], ["64x64", "32x32", "16x16", "8x8"])
ax.set_ylim(-4.1, 0.5)
ax.set_xticks([])
ax.set_title("SD 1.5 U-Net: blocks in execution order (numbers: output channels), skip connections in orange")
for s in ("top", "right", "bottom"):
    ax.spines[s].set_visible(False)
plt.tight_layout()
plt.show()

# %% [markdown]
# The skips carry fine detail straight across: the deep, low-resolution path knows *what* is where, the skips know
# exactly *where*. In backward, `UNet.backward` adds each skip's gradient to the gradient flowing into the input
# block that produced it (`dh = dh + dskips[j]`), because that output fed two consumers.
#
# ## The timestep embedding
#
# The network must know how noisy its input is. $t$ (an integer 0-999, or fractional for some samplers) becomes a
# vector of sinusoids at geometrically spaced frequencies, as a Transformer's positions do:
#
# $$\mathrm{emb}(t) = [\cos(t\,\omega_0), \dots, \cos(t\,\omega_{159}), \sin(t\,\omega_0), \dots, \sin(t\,\omega_{159})],\qquad
# \omega_i = 10000^{-i/160}.$$
#
# (SD puts the cosines first: `flip_sin_to_cos=True` in diffusers' terms; getting this order wrong is a classic
# silent bug.) A two-layer MLP (`time_embed.0`, SiLU, `time_embed.2`) maps the 320 numbers to 1280, and **every
# ResBlock** adds a per-channel projection of it (`emb_layers.1`) to its feature map: the timestep conditions
# every pixel of every channel.

# %%
emb = timestep_embedding(np.arange(1000), 320)  # (1000, 320) [cos | sin]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].imshow(emb.T, aspect="auto", cmap="RdBu", interpolation="nearest")
axes[0].set(xlabel="timestep t", ylabel="embedding dimension", title="timestep_embedding(t, 320): cos | sin")
similarity = emb @ emb.T / 160  # cosine similarity (every embedding has norm sqrt(160))
axes[1].imshow(similarity, cmap="viridis")
axes[1].set(xlabel="t", ylabel="t'", title="similarity of emb(t) and emb(t')")
plt.tight_layout()
plt.show()

# %% [markdown]
# Nearby timesteps get similar vectors and distant ones nearly orthogonal ones: the MLP can read off the noise
# level smoothly.
#
# ## Self-attention vs cross-attention
#
# Each SpatialTransformer flattens the feature map into $HW$ tokens (GroupNorm, then `proj_in`), runs a
# `BasicTransformerBlock`, and folds the tokens back into a map (`proj_out`, plus a residual):
#
# * `attn1`, **self-attention**: queries, keys and values all come from the image tokens. Every pixel looks at every
#   other pixel: $L = S = HW$.
# * `attn2`, **cross-attention**: queries from the image tokens, keys and values from the 77 text tokens. This is
#   the only place the prompt enters the U-Net: $L = HW$, $S = 77$.
# * a GEGLU feed-forward, each of the three with a pre-LayerNorm and a residual.
#
# The cache of the forward we just ran holds each attention's (head-split) queries and keys. Here are the ones of
# the first SpatialTransformer (`input_blocks.1.1`, 64x64):

# %%
st_cache = cache.layers[2]  # layer caches in forward order: conv_in, input_blocks.1.0 (res), input_blocks.1.1 (st)
c_norm, c_in, c_blocks, c_out, _ = st_cache
c_n1, c_attn1, c_n2, c_attn2, *_ = c_blocks[0]
for name, layer_cache in (("attn1 (self)", c_attn1), ("attn2 (cross)", c_attn2)):
    q, k = layer_cache[3].q, layer_cache[3].k  # AttentionCache: (N*heads, tokens, head dim)
    print(f"{name:13s} q {q.shape}  k {k.shape}  ->  scores per head: {q.shape[1]} x {k.shape[1]}")

# %% [markdown]
# The score matrix is where attention's cost lives. For the real SD 1.5 at 512x512 (batch 2 for guidance,
# 8 heads, float32):

# %%
for hw in (64, 32, 16):
    L = hw * hw
    self_gb, cross_mb = 2 * 8 * L * L * 4 / 2**30, 2 * 8 * L * 77 * 4 / 2**20
    print(f"{hw}x{hw}: {L:5d} tokens   self-attention scores {self_gb:6.3f} GiB   cross-attention {cross_mb:5.1f} MiB")

# %% [markdown]
# Self-attention at the top level would need 1 GiB for its scores alone, per layer. minisd's
# `attention_forward` never materialises them: it processes blocks of query rows and keeps only one
# log-sum-exp per row for the backward pass (see [docs/backward_attention.md](../docs/backward_attention.md)).
# The cost is quadratic in the number of tokens, so each halving of the resolution makes self-attention 16x
# cheaper. SD 1.5 attends at 64x64, 32x32 and 16x16 (`attention_resolutions = (4, 2, 1)` lists the downsampling
# factors 1, 2, 4) and once more in the middle block at 8x8; the ResBlocks of the 8x8 level have no transformer.
#
# ## Where the parameters are

# %%
kinds = Counter()
for name, s in shapes.items():
    n = int(np.prod(s))
    if ".attn1." in name or ".attn2." in name:
        kinds["attention (q, k, v, out)"] += n
    elif ".ff." in name:
        kinds["GEGLU feed-forward"] += n
    elif "proj_in" in name or "proj_out" in name:
        kinds["transformer proj_in/out"] += n
    elif "norm" in name or "in_layers.0" in name or "out_layers.0" in name or name.startswith(PREFIX + "out.0."):
        kinds["GroupNorm / LayerNorm"] += n
    elif "emb_layers" in name or "time_embed" in name:
        kinds["timestep embedding + projections"] += n
    else:
        kinds["convolutions"] += n
labels, counts = zip(*kinds.most_common())
plt.figure(figsize=(7, 2.8))
plt.barh(labels[::-1], np.array(counts[::-1]) / 1e6)
plt.xlabel("millions of parameters")
plt.title("SD 1.5 U-Net parameters by kind")
plt.tight_layout()
plt.show()

# %% [markdown]
# Convolutions hold most of the weights, but at 64x64 the attention layers do much of the *work*; the FLOP count
# is in [notebook 5](05_autoencoder.ipynb), which also shows why all of this runs on 64x64 latents instead of
# 512x512 pixels.
#
# ## Summary
#
# * The U-Net is 12 input blocks, a middle block and 12 output blocks; skips concatenate input block
#   $11-i$ into output block $i$.
# * $t$ enters through a sinusoidal embedding added in every ResBlock; the text enters only through cross-attention.
# * **Next:** [notebook 5](05_autoencoder.ipynb), the autoencoder.
