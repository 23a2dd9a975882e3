# Source of notebooks/05_autoencoder.ipynb (percent format; build with `python notebooks/_build.py`).

# %% [markdown]
# # 5. The autoencoder: why Stable Diffusion diffuses latents, not pixels
#
# Stable Diffusion is a *latent* diffusion model (Rombach et al. 2022). A variational autoencoder (`AutoencoderKL`,
# minisd's [`models/vae.py`](../minisd/models/vae.py)) compresses a 512x512x3 image into a 64x64x4 latent, the
# U-Net of notebook 4 does all its denoising there, and the decoder turns the final latent back into pixels.
# This notebook encodes and decodes real digits with the autoencoder of minisd's tiny default model, looks at the
# latent space and its scaling factor (SD's famous 0.18215), and counts what working in latent space saves.
#
# Needs MNIST and the default model (it ships inside minisd; `MINISD_MODEL` picks another model file). About 30 s.

# %%
import dataclasses
import re
import time

import numpy as np
import matplotlib.pyplot as plt

from minisd.diffusion import SD15_SCHEDULER, make_alphas_cumprod, make_betas, snr
from minisd.models import vae as vae_module
from minisd.models.unet import SD15, UNet, build_plan
from minisd.train.data import prepare
from nbutil import load, load_default_model, show

mnist = load("mnist", "test")
model = load_default_model()  # minisd.sdmodel.StableDiffusion: unet, vae, text_encoder, tokenizer, scheduler

# %% [markdown]
# ## Encoding and decoding
#
# The encoder maps an image $x$ to the parameters of a diagonal Gaussian over latents,
# $q(z\mid x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x))$ (`VAE.encode` returns a `Posterior` with `mean`,
# `logvar`, `std`); the decoder maps a latent back to an image. The default model's autoencoder was trained on MNIST
# digits padded to 32x32 and repeated to RGB (every SD VAE is RGB), with the SD VAE's architecture at a smaller
# width: 3 levels, so $f = 4$: 32x32x3 pixels -> 8x8x4 latents.

# %%
%%needs_data
%%needs_model
vae = model.vae
print(vae.config)
x = prepare(mnist.images[:8], pad=2, rgb=True)  # (8, 3, 32, 32) float32 in [-1, 1], as in training
posterior, _ = vae.encode(x)
recon, _ = vae.decode(posterior.mean)  # decode the posterior mean
print(f"image {x.shape} -> latent mean {posterior.mean.shape} -> reconstruction {recon.shape}")
print(f"posterior std: mean {posterior.std.mean():.4f} (the latent of an image is almost deterministic)")
mse = np.mean((np.clip(recon, -1, 1) - x) ** 2)
print(f"reconstruction PSNR {10 * np.log10(4 / mse):.1f} dB on these 8 digits (pixel range 2)")
show(np.concatenate([x, np.clip(recon, -1, 1)]), cols=8, size=1.2, suptitle="top: input, bottom: decode(encode(x))")

# %% [markdown]
# The autoencoder is trained with a reconstruction loss plus a very weak KL term pulling $q(z\mid x)$ towards
# $\mathcal N(0, I)$ (weight $10^{-6}$ here; SD's VAE also had perceptual and adversarial losses). The KL term is so
# weak that the posterior std is tiny: the latent is essentially a deterministic compressed code, and sampling
# from the posterior barely changes the decoded image.
#
# ## What a latent looks like
#
# A latent is an 8x8 image with 4 channels. It is not a picture of the digit, but it is spatially aligned with it:
# each latent pixel describes a 4x4 patch of the image.

# %%
%%needs_data
%%needs_model
fig, axes = plt.subplots(3, 6, figsize=(8, 4.2))
for row in range(3):
    axes[row, 0].imshow((x[row, 0] + 1) / 2, cmap="gray", vmin=0, vmax=1)
    axes[row, 0].set_title("image" if row == 0 else "", fontsize=8)
    for ch in range(4):
        axes[row, ch + 1].imshow(posterior.mean[row, ch], cmap="RdBu")
        axes[row, ch + 1].set_title(f"latent ch {ch}" if row == 0 else "", fontsize=8)
    axes[row, 5].imshow((np.clip(recon[row, 0], -1, 1) + 1) / 2, cmap="gray", vmin=0, vmax=1)
    axes[row, 5].set_title("decoded" if row == 0 else "", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.tight_layout()
plt.show()

# %% [markdown]
# Decoding straight-line interpolations between the latents of two digits, against the same interpolation in
# pixel space:

# %%
%%needs_data
%%needs_model
w = np.linspace(0, 1, 7, dtype=np.float32)[:, None, None, None]
z_mix = (1 - w) * posterior.mean[[0]] + w * posterior.mean[[1]]  # (7, 4, 8, 8)
decoded, _ = vae.decode(z_mix)
pixels = (1 - w) * x[[0]] + w * x[[1]]
show(np.concatenate([np.clip(decoded, -1, 1), pixels]), cols=7, size=1.2,
     suptitle="top: interpolating latents, bottom: interpolating pixels")

# %% [markdown]
# Pixel interpolation is a double exposure: two faint digits on top of each other. Every decoded latent is a
# single image with sharp strokes, though the ones half way are not always digits: this small autoencoder was
# trained only to reconstruct, with an almost-zero KL weight, so nothing shapes the space *between* the codes of
# real digits. Making that space meaningful is the diffusion model's job, not the autoencoder's.
#
# ## The scaling factor (SD: 0.18215)
#
# The diffusion model does not see $z$ but $\text{scale\_factor}\cdot z$. Notebook 1's forward process assumes
# data of roughly **unit variance**: $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ has signal-to-noise
# ratio $\mathrm{Var}(x_0)\,\bar\alpha_t/(1-\bar\alpha_t)$. If the latents had standard deviation 5, every noise level
# would be 25x "cleaner" than the schedule intends, and the last step would be far from pure noise.
#
# So the latents are rescaled by $1/\mathrm{std}(z)$, measured once on training data. Rombach et al. did this for
# SD's VAE and got **0.18215** (its latents have a std of about 5.5); it is a constant of that VAE, stored in the
# model config (`scale_factor`), applied by `encode_latents` and undone by `decode_latents`. minisd measured the
# default model's factor the same way when training it:

# %%
%%needs_data
%%needs_model
scale = vae.config.scale_factor
post_all, _ = vae.encode(prepare(mnist.images[:1000], pad=2, rgb=True))
z = post_all.sample(rng=np.random.default_rng(0))
print(f"scale_factor = {scale:.5f};  std of z = {z.std():.3f};  std of scale_factor * z = {(scale * z).std():.3f}")
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].hist(z.ravel(), bins=100, density=True, alpha=0.6, label="z")
axes[0].hist((scale * z).ravel(), bins=100, density=True, alpha=0.6, label="scale_factor * z")
axes[0].legend()
axes[0].set_title("latent values, 1000 test digits")
abar = make_alphas_cumprod(make_betas(SD15_SCHEDULER))
for s, label in ((scale * z.std(), "scaled latents (what SD trains on)"), (z.std(), "unscaled latents")):
    axes[1].plot(np.log10(s ** 2 * snr(abar)), label=label)
axes[1].set(xlabel="t", ylabel=r"$\log_{10}$ SNR", title="effective SNR of the SD schedule")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Why diffuse in latent space: the cost
#
# Every denoising step runs the whole U-Net. Its cost grows with the number of input pixels for convolutions, and
# with its **square** for self-attention. Count the multiply-adds (x2 = FLOPs) of SD 1.5's U-Net from its block plan
# (`build_plan`, notebook 4): on a 64x64x4 latent (a 512x512 image), and on the 512x512x3 image itself with the same
# architecture.

# %%
def unet_flops(cfg, side, tokens=77):
    """FLOPs (2 x multiply-adds) of one U-Net forward on one (C, side, side) input, by kind of work."""
    out = {"convolutions": 0.0, "attention scores (QK^T, PV)": 0.0, "linear layers in transformers": 0.0}
    hw = side * side

    def conv(cin, cout, k, n):
        out["convolutions"] += 2.0 * cin * cout * k * k * n

    plan = build_plan(cfg)
    for L in [layer for block in plan.input_blocks + [plan.middle] + plan.output_blocks for layer in block]:
        if L.kind == "down":
            hw //= 4
        elif L.kind == "up":
            hw *= 4
        if L.kind in ("conv", "down", "up"):
            conv(L.cin, L.cout, 3, hw)
        elif L.kind == "res":
            conv(L.cin, L.cout, 3, hw)
            conv(L.cout, L.cout, 3, hw)
            if L.cin != L.cout:
                conv(L.cin, L.cout, 1, hw)  # skip_connection
        elif L.kind == "st":
            c, ctx = L.cin, cfg.context_dim
            # proj_in/out, attn1 q/k/v/out, attn2 q/out, GEGLU (c -> 8c, 4c -> c); attn2 k/v read the 77 tokens
            out["linear layers in transformers"] += 2.0 * hw * c * c * (2 + 4 + 2 + 8 + 4) + 2.0 * tokens * ctx * c * 2
            out["attention scores (QK^T, PV)"] += 2.0 * 2 * hw * hw * c + 2.0 * 2 * hw * tokens * c  # self + cross
    conv(cfg.model_channels, cfg.out_channels, 3, hw)
    return out


latent = unet_flops(SD15, 64)
pixel = unet_flops(dataclasses.replace(SD15, in_channels=3, out_channels=3), 512)  # same U-Net on RGB pixels
print(f"{'':32s} {'64x64x4 latent':>16s} {'512x512x3 pixels':>18s} {'ratio':>8s}")
for k in latent:
    print(f"{k:32s} {latent[k] / 1e9:13.0f} GF {pixel[k] / 1e9:15.0f} GF {pixel[k] / latent[k]:8.0f}x")
total_l, total_p = sum(latent.values()), sum(pixel.values())
print(f"{'total per U-Net call':32s} {total_l / 1e12:13.2f} TF {total_p / 1e12:15.1f} TF {total_p / total_l:8.0f}x")

# %% [markdown]
# Convolutions become 64x more expensive in pixel space (64x more pixels) and self-attention about 4000x
# (4096 -> 262,144 tokens, squared). One 512x512 pixel-space U-Net call would cost as much as several hundred
# latent-space calls, and its top-level attention scores alone would need $262144^2 \times 4$ bytes = 256 GiB per
# head. The autoencoder is paid for once per image, not once per step. Its decoder, from the SD VAE's weight
# shapes:

# %%
def vae_decode_flops(cfg, side):
    """FLOPs of one VAE decode to a side x side image: every conv, from its weight shape and resolution."""
    levels = len(cfg.ch_mult)
    total = 0.0
    for name, shape in vae_module.param_shapes(cfg, prefix="").items():
        if not name.endswith(".weight") or len(shape) != 4 or not (name.startswith("decoder") or "post_quant" in name):
            continue
        m = re.match(r"decoder\.up\.(\d+)\.(\w+)", name)
        if m:  # level i runs at side / 2^i; its upsample conv runs after the 2x upsampling
            res = side // 2 ** int(m.group(1)) * (2 if m.group(2) == "upsample" else 1)
        elif name.startswith("decoder.conv_out"):
            res = side
        else:  # post_quant_conv, conv_in, mid (including the mid attention's 1x1 q/k/v/proj_out)
            res = side // 2 ** (levels - 1)
        total += 2.0 * np.prod(shape) * res * res
    lowest = (side // 2 ** (levels - 1)) ** 2  # + the mid block's self-attention scores over lowest^2 tokens
    return total + 2.0 * 2 * lowest * lowest * cfg.ch * cfg.ch_mult[-1]


dec = vae_decode_flops(vae_module.SD, 512)
print(f"SD VAE decode of one 512x512 image: {dec / 1e12:.2f} TF "
      f"= {dec / total_l:.1f} latent U-Net calls; a 50-step sample with guidance makes 50 U-Net calls on a batch of 2")

# %% [markdown]
# Measured, not just counted: the default model's own U-Net on its 8x8x4 latents against the same U-Net
# architecture (random weights) on the 32x32x3 pixels the autoencoder sees:

# %%
%%needs_model
ucfg = model.unet.config
pixel_unet = UNet(dataclasses.replace(ucfg, in_channels=3, out_channels=3), rng=np.random.default_rng(0))
context = np.zeros((2, 77, ucfg.context_dim), np.float32)
timings = {}
for name, net, shape in (("latent 8x8x4", model.unet, (2, 4, 8, 8)), ("pixels 32x32x3", pixel_unet, (2, 3, 32, 32))):
    xin = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        net.forward(xin, 500, context)
        best.append(time.perf_counter() - t0)
    timings[name] = min(best)
    print(f"{name:15s} U-Net forward, batch 2: {1000 * timings[name]:7.1f} ms  "
          f"(counted {sum(unet_flops(net.config, shape[2]).values()) / 1e9:.2f} GF per image)")
print(f"pixel / latent: {timings['pixels 32x32x3'] / timings['latent 8x8x4']:.0f}x slower per sampling step")

# %% [markdown]
# ## Summary
#
# * The autoencoder compresses images $f^2 \cdot 3/4$-fold ($f = 8$ for SD: 48x) into a spatial latent that keeps
#   the layout and drops imperceptible detail; diffusion runs entirely in that space.
# * Latents are multiplied by `scale_factor` = 1/std so the noise schedule sees unit-variance data.
# * The saving is quadratic for attention: it is what makes 512x512 generation affordable at all.
# * **Next:** [notebook 6](06_clip.ipynb), the text encoder.
