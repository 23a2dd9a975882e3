"""AutoencoderKL training task: L1 reconstruction + KL to N(0, I), the first stage of Stable Diffusion.

LDM trains its autoencoder with L1 + LPIPS + a patch GAN + a tiny KL term (LPIPSWithDiscriminator). At MNIST scale
there is no perceptual network to use (no downloads) and none is needed, so the loss keeps LDM's other two terms
with LDM's normalisation (sums over pixels and latent elements, mean over the batch):

    post = encode(x);  z = post.mean + post.std * noise;  x_rec = decode(z)
    loss = sum|x - x_rec| / N + kl_weight * sum KL(post || N(0, I)) / N          (kl_weight 1e-6 as SD's config)

The KL term mostly keeps the latents bounded; the latent diffusion task measures their std and rescales them
(diffusion.py), as SD does with 0.18215.

Shapes: x (N, C, 32, 32) in [-1, 1] (MNIST padded by 2, grey repeated to RGB) -> moments (N, 2E, 8, 8) ->
z (N, E, 8, 8) -> x_rec (N, C, 32, 32). f = 4 for ch_mult of length 3.
References:
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/losses/contperceptual.py (nll, kl terms)
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/models/autoencoder.py (AutoencoderKL.training_step)
"""
import numpy as np

from ..models.vae import VAE, posterior_backward
from .plots import image_grid
from .recipes import build_config, config_to_dict
from .task import Task, register


@register("vae")
class VAETask(Task):

    def build(self):
        cfg = build_config("vae", self.recipe["vae"])
        C, H, W = self.data.image_shape
        if cfg.in_channels != C or cfg.out_ch != C:
            raise self.error(f"vae in_channels/out_ch must be {C} for these images (rgb={self.recipe['rgb']}), "
                             f"got {cfg.in_channels}/{cfg.out_ch}")
        f = cfg.downsample_factor
        if H % f or W % f:
            raise self.error(f"images of {H}x{W} are not divisible by the VAE's downsampling {f}: set pad (MNIST "
                             f"28 + 2*2 = 32)")
        self.vae = VAE(cfg, rng=self.init_rng)
        self.models = {"vae": self.vae}

    def step(self, idx, rng):
        x, _ = self.data.batch(idx, rng)
        N = x.shape[0]
        vae, w = self.vae, self.recipe["kl_weight"]
        post, ecache = vae.encode(x, keep_cache=True, rng=rng)
        noise = rng.standard_normal(post.mean.shape, dtype=post.mean.dtype)
        z = post.sample(noise=noise)  # reparameterised: gradients flow to mean and logvar
        xr, dcache = vae.decode(z, keep_cache=True, rng=rng)
        diff = xr - x
        rec = float(np.abs(diff).sum()) / N
        kl = float(post.kl().sum()) / N
        drec = (np.sign(diff) / np.float32(N)).astype(x.dtype)  # d sum|x_rec - x| / N
        dz = vae.decode_backward(drec, dcache)
        dmom = posterior_backward(post, dsample=dz, noise=noise, dkl=np.full(N, w / N, dtype=x.dtype))
        vae.encode_backward(dmom, ecache)
        pixels = diff.size / N
        return rec + w * kl, {"l1_per_pixel": rec / pixels, "kl": kl}

    def _reconstruct(self, x):
        out = []
        for s in range(0, len(x), 250):
            post, _ = self.vae.encode(x[s:s + 250])
            out.append(self.vae.decode(post.mean)[0])
        return np.concatenate(out)

    def evaluate(self, full=False):
        test = self.test_data()
        n = len(test) if full else min(len(test), self.recipe["eval_size"])
        x, _ = test.batch(np.arange(n), augment=False)
        xr = np.clip(self._reconstruct(x), -1, 1)
        mse01 = float(np.mean(((xr - x) / 2) ** 2))  # on the [0, 1] pixel scale
        return {"test_mse": mse01, "test_psnr_db": float(10 * np.log10(1.0 / max(mse01, 1e-12))),
                "test_images": n}

    def sample_grid(self, rng):
        """Rows of 8: test images, their reconstructions (posterior mean), alternating."""
        x, _ = self.test_data().batch(np.arange(32), augment=False)
        xr = self._reconstruct(x)
        rows = [r for i in range(4) for r in (x[8 * i:8 * i + 8], xr[8 * i:8 * i + 8])]
        return image_grid(np.concatenate(rows), 8, row_labels=["input", "recon"] * 4)

    def export_meta(self):
        return {"kind": "vae", "vae": config_to_dict(self.vae.config), "dataset": self.recipe["dataset"],
                "image_shape": list(self.data.image_shape), "pad": self.recipe["pad"], "rgb": self.recipe["rgb"],
                "kl_weight": self.recipe["kl_weight"]}
