"""Diffusion training tasks: pixel-space DDPM (MNIST / CIFAR-10) and text-conditioned latent diffusion (tiny SD).

Both minimise L_simple (DDPM eq. 14): t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, loss =
mean (eps_theta(x_t, t, c) - eps)^2 (or the v / x0 target of the scheduler's prediction_type).

Conditioning and classifier-free guidance (Ho & Salimans 2022): the model is trained both with and without its
condition by dropping it for a share of the batch, then sampled with
    eps = eps(x, null) + s * (eps(x, c) - eps(x, null))           s = guidance_scale (1: no guidance)
  pixel_ddpm: c = class label; the U-Net's label_emb has num_classes = classes + 1 rows and the last row is the
              "no class" token (the dropped label). unconditional recipes have no label_emb at all.
  latent_ddpm: c = the frozen text encoder's hidden states (N, 77, D) of a caption ("a handwritten seven"); the
              dropped caption is "" (SD's 10% text dropout; the pipeline's negative prompt is "" too).

Latent diffusion (Rombach et al. 2022): images (32x32, MNIST padded by 2) are encoded once by the frozen VAE into
the posterior's mean and std (N, 4, 8, 8); each step samples z = mean + std * noise and trains on scale * z, with
scale = 1 / std(z) measured on the first batches (SD measured 0.18215 the same way). The exported model is a
complete minisd StableDiffusion file whose VAE config carries that scale, so `load_minisd` and `minisd txt2img` use
it as they would SD 1.5.

Shapes: x0, noise, x_t, eps (N, C, H, W); t (N,) int64; labels (N,) int64; context (N, 77, D).
References:
  Ho et al. 2020, DDPM, https://arxiv.org/abs/2006.11239 (Algorithm 1, eq. 14)
  Ho & Salimans 2022, Classifier-Free Diffusion Guidance, https://arxiv.org/abs/2207.12598 (eq. 6, p_uncond 0.1-0.2)
  Rombach et al. 2022, LDM, https://arxiv.org/abs/2112.10752 (sec. 3-4.3; the latent scale factor, appendix G)
  LDM training step: https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/models/diffusion/ddpm.py (p_losses)
"""
import numpy as np

from ..diffusion.schedule import (make_alphas_cumprod, make_betas, q_sample, sample_timesteps,
                                  training_target)
from ..models.unet import UNet
from ..ops.loss import mse_loss_backward, mse_loss_forward
from .data import prepare
from .plots import image_grid
from .recipes import build_config, config_to_dict
from .sampling import denoiser, generate, sample_text
from .task import Task, register


class _DiffusionBase(Task):
    """What pixel and latent diffusion share: the schedule, L_simple and the training step."""

    def _setup_schedule(self):
        self.scheduler = build_config("scheduler", self.recipe["scheduler"])
        self.alphas_cumprod = make_alphas_cumprod(make_betas(self.scheduler))  # (T,) float32

    def _loss(self, x0, cond_kw, rng):
        """x0 (N, C, H, W) clean samples; cond_kw {"y": labels} or {"context": ...} -> loss, with grads."""
        N = x0.shape[0]
        t = sample_timesteps(rng, N, self.scheduler.num_train_timesteps)  # (N,) int64
        noise = rng.standard_normal(x0.shape, dtype=x0.dtype)
        xt = q_sample(x0, t, noise, self.alphas_cumprod)
        out, cache = self.unet.forward(xt, t, keep_cache=True, rng=rng, **cond_kw)  # rng: ResBlock dropout
        target = training_target(x0, noise, t, self.scheduler.prediction_type, self.alphas_cumprod)
        loss, c_loss = mse_loss_forward(out, target)
        self.unet.backward(mse_loss_backward(1.0, c_loss), cache)
        return float(loss)

    def sampling_defaults(self):
        r = self.recipe
        return {"sampler": r["sampler"], "steps": r["sample_steps"], "guidance_scale": r["guidance_scale"]}


# ----------------------------------------------------------------------------------------------------------------
# pixel space

@register("pixel_ddpm")
class PixelDDPMTask(_DiffusionBase):

    def build(self):
        r = self.recipe
        self._setup_schedule()
        cfg = build_config("unet", r["unet"])
        C, H, W = self.data.image_shape
        n_cls = len(self.data.class_names)
        if cfg.in_channels != C or cfg.out_channels != C:
            raise self.error(f"unet in/out_channels must be {C} for {r['dataset']} (rgb={r['rgb']}), got "
                             f"{cfg.in_channels}/{cfg.out_channels}")
        if H % cfg.downsample_factor or W % cfg.downsample_factor:
            raise self.error(f"images of {H}x{W} are not divisible by the U-Net's downsampling "
                             f"{cfg.downsample_factor}; change pad or channel_mult")
        if r["class_conditional"] and cfg.num_classes != n_cls + 1:
            raise self.error(f"a class-conditional U-Net needs unet.num_classes = {n_cls + 1} ({n_cls} classes "
                             f"+ the null class for guidance), got {cfg.num_classes}")
        if not r["class_conditional"] and cfg.num_classes is not None:
            raise self.error("class_conditional is false: set unet.num_classes to null")
        if cfg.context_dim is not None:
            raise self.error("a pixel DDPM has no text: set unet.context_dim to null")
        self.null_class = n_cls if r["class_conditional"] else None
        # label_emb starts at N(0, 1) like PyTorch's nn.Embedding: with a fan-in uniform init (+-0.125) the class
        # signal is ~10x weaker than the timestep embedding it is added to, and conditioning appears hundreds of
        # steps later (measured: 36% vs >90% of samples classified correctly after ~500 steps; docs/training.md)
        self.unet = UNet(cfg, rng=self.init_rng)
        self.models = {"unet": self.unet}

    def step(self, idx, rng):
        x0, y = self.data.batch(idx, rng)
        cond = {}
        if self.null_class is not None:
            drop = rng.random(len(y)) < self.recipe["label_dropout"]  # (N,) labels replaced by the null class
            cond = {"y": np.where(drop, self.null_class, y)}
        return self._loss(x0, cond, rng), {}

    def sample(self, labels, rng, guidance=None, sampler=None, steps=None, progress=None):
        """labels (N,) ints (ignored for unconditional models, which use len(labels)) -> images (N, C, H, W)."""
        d = self.sampling_defaults()
        g = d["guidance_scale"] if guidance is None else guidance
        labels = np.asarray(labels, dtype=np.int64)
        if self.null_class is None:
            fn = denoiser(self.unet, None, by="y")
        else:
            fn = denoiser(self.unet, labels, np.full_like(labels, self.null_class), g, by="y")
        shape = (len(labels),) + tuple(self.data.image_shape)
        return generate(fn, self.scheduler, shape, rng, sampler or d["sampler"], steps or d["steps"], progress)

    def sample_grid(self, rng):
        cols = self.recipe["grid_columns"]
        if self.null_class is None:
            x = self.sample(np.zeros(cols * cols, np.int64), rng)
            return image_grid(x, cols)
        n = len(self.data.class_names)
        labels = np.repeat(np.arange(n), cols)  # row r = class r
        return image_grid(self.sample(labels, rng), cols, row_labels=list(self.data.class_names))

    def export_meta(self):
        return {"kind": "pixel_ddpm", "unet": config_to_dict(self.unet.config),
                "scheduler": self.scheduler.to_dict(), "dataset": self.recipe["dataset"],
                "image_shape": list(self.data.image_shape), "pad": self.recipe["pad"], "rgb": self.recipe["rgb"],
                "class_names": list(self.data.class_names), "null_class": self.null_class,
                **self.sampling_defaults()}


# ----------------------------------------------------------------------------------------------------------------
# latent space, text-conditioned: the tiny Stable Diffusion

@register("latent_ddpm")
class LatentDDPMTask(_DiffusionBase):

    def build(self):
        from .checkpoints import load_model_file
        from .clip import CLIPParts, caption_table
        r = self.recipe
        if r["augment"] != "none":
            raise self.error("latent_ddpm trains on latents encoded once: set augment to \"none\"")
        self._setup_schedule()
        if self.frozen is not None:  # resuming / sampling from a checkpoint: the parts it was trained with
            vae_file, clip_file = split_frozen(self.frozen)
        else:
            vae_file, clip_file = load_model_file(r["vae_model"]), load_model_file(r["clip_model"])
        if vae_file.kind != "vae":
            raise self.error(f"vae_model {r['vae_model']} is a {vae_file.kind} model, not a VAE")
        if clip_file.kind != "clip":
            raise self.error(f"clip_model {r['clip_model']} is a {clip_file.kind} model, not a tiny CLIP")
        self.vae_file, self.clip_file = vae_file, clip_file
        from ..models.vae import VAE
        self.vae = VAE(build_config("vae", vae_file.meta["vae"]), params=vae_file.params("first_stage_model."))
        self.clip = CLIPParts.from_file(clip_file)
        ucfg = build_config("unet", r["unet"])
        f = self.vae.config.downsample_factor
        C, H, W = self.data.image_shape
        if (C, H % f, W % f) != (self.vae.config.in_channels, 0, 0):
            raise self.error(f"images {C}x{H}x{W} do not fit the VAE (in_channels {self.vae.config.in_channels}, "
                             f"sizes divisible by {f}); check pad and rgb against the VAE recipe")
        self.latent_shape = (self.vae.config.embed_dim, H // f, W // f)
        if ucfg.in_channels != self.latent_shape[0] or ucfg.out_channels != self.latent_shape[0]:
            raise self.error(f"unet in/out_channels must equal the VAE's embed_dim {self.latent_shape[0]}")
        if ucfg.context_dim != self.clip.text.config.hidden_size:
            raise self.error(f"unet.context_dim must equal the text encoder width "
                             f"{self.clip.text.config.hidden_size}")
        self.unet = UNet(ucfg, rng=self.init_rng)
        self.models = {"unet": self.unet}
        # every caption's hidden states, computed once: the text encoder is frozen (10 classes x templates)
        self.templates = list(clip_file.meta["captions"])
        self.class_names = list(clip_file.meta["class_names"])
        self.context, self.null_context = caption_table(self.clip, self.templates, self.class_names)
        self._latents = None
        if "scale_factor" not in self.state:
            if not self.has_data:
                raise self.error("the latent scale factor is unknown (no task state and no data to measure it)")
            self.state["scale_factor"] = self._measure_scale()
        self.scale = float(self.state["scale_factor"])

    # -------------------------------------------------------------------------------------------- data
    def _encode_all(self):
        """Posterior mean and std (N, E, h, w) of every training image (VAE encoder, inference, in batches)."""
        if self._latents is None:
            means, stds = [], []
            n = len(self.data)
            for s in range(0, n, 500):
                x = prepare(self.data.images[s:s + 500], self.data.pad, self.data.rgb)
                post, _ = self.vae.encode(x)
                means.append(post.mean)
                stds.append(post.std)
            self._latents = (np.concatenate(means), np.concatenate(stds))
        return self._latents

    def _measure_scale(self):
        """1 / std of posterior samples over latent_batches batches (SD's scale_factor, measured the same way)."""
        mean, std = self._encode_all()
        rng = np.random.default_rng([self.recipe["seed"], 4])
        n = min(len(mean), self.recipe["latent_batches"] * self.recipe["batch_size"])
        idx = rng.permutation(len(mean))[:n]
        z = mean[idx] + std[idx] * rng.standard_normal(mean[idx].shape, dtype=np.float32)
        return float(1.0 / z.astype(np.float64).std())

    def step(self, idx, rng):
        mean, std = self._encode_all()
        labels = self.data.labels[idx]
        z = mean[idx] + std[idx] * rng.standard_normal(mean[idx].shape, dtype=np.float32)  # posterior sample
        x0 = z * np.float32(self.scale)
        tmpl = rng.integers(0, len(self.templates), size=len(idx))  # a random caption per image
        ctx = self.context[labels, tmpl]  # (N, 77, D)
        drop = rng.random(len(idx)) < self.recipe["caption_dropout"]
        ctx = np.where(drop[:, None, None], self.null_context[None], ctx)  # dropped captions become ""
        return self._loss(x0, {"context": ctx}, rng), {}

    # -------------------------------------------------------------------------------------------- sampling
    def encode_prompts(self, prompts):
        return self.clip.encode_text_hidden(prompts)

    def sample(self, prompts, rng, guidance=None, sampler=None, steps=None, progress=None):
        """prompts: list of N strings -> images (N, C, H, W) in about [-1, 1] (decoded by the VAE)."""
        d = self.sampling_defaults()
        return sample_text(self.unet, self.encode_prompts, self.null_context,
                           lambda lat: self.vae.decode(lat / np.float32(self.scale))[0], self.scheduler,
                           self.latent_shape, prompts, rng, d["guidance_scale"] if guidance is None else guidance,
                           sampler or d["sampler"], steps or d["steps"], progress)

    def digit_prompts(self):
        """The prompt used for grids and evaluation: "a handwritten <name>" for every class."""
        from .clip import DIGIT_NAMES
        return [f"a handwritten {DIGIT_NAMES[i] if i < len(DIGIT_NAMES) else c}"
                for i, c in enumerate(self.class_names)]

    def sample_grid(self, rng):
        cols = self.recipe["grid_columns"]
        prompts = [p for p in self.digit_prompts() for _ in range(cols)]
        return image_grid(self.sample(prompts, rng), cols,
                          row_labels=[p.replace("a handwritten ", "") for p in self.digit_prompts()])

    def frozen_tensors(self):
        out = dict(self.vae_file.tensors)
        out.update(self.clip_file.tensors)
        return out

    def frozen_meta(self):
        return {"vae": self.vae_file.meta, "clip": self.clip_file.meta}


    def export_meta(self):
        return {"kind": "sd", "dataset": self.recipe["dataset"], "image_shape": list(self.data.image_shape),
                "pad": self.recipe["pad"], "rgb": self.recipe["rgb"], "class_names": self.class_names,
                "captions": self.templates, "clip": self.clip_file.meta, "latent_scale": self.scale,
                **self.sampling_defaults()}

    def export(self, path, extra, dtype=None):
        """A complete minisd StableDiffusion file (load_minisd reads it) plus the tiny CLIP's image tower and
        temperature (for CLIP scores), with "minisd_model" metadata for sample/eval."""
        from .checkpoints import write_model_file
        sd = self.stable_diffusion()
        tensors = sd.state_dict()
        tensors.update({k: v for k, v in self.clip_file.tensors.items() if not k.startswith("cond_stage_model.")})
        return write_model_file(path, tensors, dict(self.export_meta(), **extra), sd_meta=sd.config_dict(),
                                dtype=dtype)

    def stable_diffusion(self):
        """The trained parts as a minisd StableDiffusion (VAE scale_factor = the measured latent scale)."""
        import dataclasses

        from ..models.vae import VAE
        from ..sdmodel import StableDiffusion
        from ..tokenizer import CLIPTokenizer
        vcfg = dataclasses.replace(self.vae.config, scale_factor=self.scale)
        vae = VAE(vcfg, params=self.vae.params)
        return StableDiffusion(self.unet, vae, self.clip.text, CLIPTokenizer.sd1(), self.scheduler,
                               prediction_type=self.scheduler.prediction_type, sample_size=self.latent_shape[1],
                               name=self.recipe["name"],
                               notes="tiny text-to-image SD trained on MNIST with minisd (docs/training.md)")


def split_frozen(frozen):
    """{"tensors": {...}, "meta": {"vae": ..., "clip": ...}} from a checkpoint -> (VAE file, CLIP file)."""
    from .checkpoints import ModelFile
    t, m = frozen["tensors"], frozen["meta"]
    vae = {k: v for k, v in t.items() if k.startswith("first_stage_model.")}
    clip = {k: v for k, v in t.items() if not k.startswith("first_stage_model.")}
    return ModelFile("vae", m["vae"], vae, "<checkpoint>"), ModelFile("clip", m["clip"], clip, "<checkpoint>")
