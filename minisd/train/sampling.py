"""Sampling trained diffusion models: classifier-free guidance, the sampler loop, and one `Generator` interface over
every kind of file `minisd sample` / `minisd eval` accept (exported pixel DDPM, exported or shipped tiny SD,
training checkpoints of either, run folders).

Guidance (Ho & Salimans 2022, eq. 6): eps = eps(x, null) + s * (eps(x, c) - eps(x, null)); both halves run as one
batch of 2N through the U-Net. The null condition is the extra "no class" label (pixel models) or the hidden states
of the empty prompt "" (text models, as SD and its pipelines do).

Shapes: x (N, C, H, W); labels (N,) int; contexts (N, 77, D); images returned in [-1, 1] (not clipped).
References: https://arxiv.org/abs/2207.12598 ; diffusers' StableDiffusionPipeline guidance step:
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py
"""
from pathlib import Path

import numpy as np

from ..diffusion import make_sampler
from ..errors import UserError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "default_model.safetensors"
CLASS_PROMPT = "a handwritten {name}"


def denoiser(unet, cond, uncond=None, guidance=1.0, by="y"):
    """A function (x (N, ...), t) -> model output (N, ...), guided. cond/uncond: labels (N,) (by="y") or
    contexts (N, S, D) (by="context"); cond None: an unconditional model."""
    def call(x, t, c):
        return unet.forward(x, t, **({} if c is None else {by: c}))[0]

    if uncond is None or guidance == 1.0:
        return lambda x, t: call(x, t, cond)

    def guided(x, t):
        both = call(np.concatenate([x, x]), t, np.concatenate([uncond, cond]))  # (2N, ...)
        e_u, e_c = np.split(both, 2)
        return e_u + np.asarray(guidance, dtype=x.dtype) * (e_c - e_u)
    return guided


def generate(model_fn, scheduler, shape, rng, sampler="ddim", steps=50, progress=None):
    """Run a sampler from pure noise: shape (N, C, H, W), model_fn from `denoiser` -> x0 (N, C, H, W)."""
    try:
        s = make_sampler(sampler, scheduler)
        s.set_timesteps(int(steps))
    except ValueError as e:
        raise UserError(str(e)) from None
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(s.init_noise_sigma)
    for t in s.timesteps:
        out = model_fn(s.scale_model_input(x, t), t)
        x = s.step(out, t, x, rng=rng)
        if progress is not None:
            progress.update(1)
    return x


def sample_text(unet, text_hidden, null_hidden, decode, scheduler, latent_shape, prompts, rng, guidance=3.0,
                sampler="ddim", steps=50, progress=None):
    """Text-to-image in latent space. text_hidden(prompts) -> (N, 77, D); null_hidden (77, D) = the hidden states
    of ""; decode(latents) -> images. Returns images (N, C, H, W)."""
    ctx = text_hidden(list(prompts))
    null = np.repeat(null_hidden[None], len(prompts), axis=0)
    fn = denoiser(unet, ctx, null, guidance, by="context")
    lat = generate(fn, scheduler, (len(prompts),) + tuple(latent_shape), rng, sampler, steps, progress)
    return decode(lat)


class Generator:
    """What sample and eval need from any diffusion model file.

    conditioning: "class" (pixel DDPM with labels), "text" (tiny SD) or "none" (unconditional pixel DDPM).
    sample(conds, rng, guidance, sampler, steps) -> images (N, C, H, W); conds = labels, prompts or a count.
    meta: the export metadata (dataset, pad, rgb, class names, ...); extras: the file (for classifier.* and
    clip_image.* tensors shipped alongside).
    """

    def __init__(self, conditioning, sample_fn, class_names, defaults, meta, source, extras=None):
        self.conditioning, self._sample = conditioning, sample_fn
        self.class_names, self.defaults, self.meta = list(class_names), dict(defaults), meta
        self.source, self.extras = str(source), extras
        self.clip = None  # CLIPParts when the model comes with its tiny CLIP

    def prompt(self, k, template=CLASS_PROMPT):
        from .clip import fill
        return fill(template, k, self.class_names)

    def sample(self, conds, rng, guidance=None, sampler=None, steps=None, progress=None):
        d = self.defaults
        return self._sample(conds, rng, d["guidance_scale"] if guidance is None else guidance,
                            sampler or d["sampler"], steps or d["steps"], progress)

    def sample_classes(self, labels, rng, template=CLASS_PROMPT, **kw):
        """Images of the requested classes (N,) (prompts from `template` for text models)."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.conditioning == "text":
            return self.sample([self.prompt(int(k), template) for k in labels], rng, **kw)
        if self.conditioning == "none":
            raise UserError(f"{self.source} is an unconditional model: it cannot be asked for a class")
        return self.sample(labels, rng, **kw)


def _defaults(meta):
    return {"sampler": meta.get("sampler", "ddim"), "steps": meta.get("steps", 50),
            "guidance_scale": meta.get("guidance_scale", 3.0)}


def resolve_model_path(path):
    """None -> the shipped default model; a run folder -> RUN/model.safetensors, else its newest checkpoint."""
    if path is None:
        if not DEFAULT_MODEL.is_file():
            raise UserError(f"the default model {DEFAULT_MODEL} is missing from this install; pass --ckpt")
        return DEFAULT_MODEL
    p = Path(path)
    if p.is_dir():
        from .checkpoints import list_checkpoints
        if (p / "model.safetensors").is_file():
            return p / "model.safetensors"
        ckpts = list_checkpoints(p)
        if ckpts:
            return ckpts[-1][1]
        raise UserError(f"{p} has neither model.safetensors nor checkpoints/ckpt-*.safetensors")
    return p


def _task_generator(task, meta, source, extras=None):
    from .diffusion import LatentDDPMTask
    if isinstance(task, LatentDDPMTask):
        def fn(prompts, rng, g, s, n, progress):
            return task.sample(list(prompts), rng, g, s, n, progress)
        gen = Generator("text", fn, task.class_names, task.sampling_defaults(), meta, source, extras)
        gen.clip = task.clip  # the frozen tiny CLIP it was trained with: CLIP scores without another file
        return gen

    def fn(labels, rng, g, s, n, progress):
        if task.null_class is None:
            labels = np.zeros(int(labels) if np.ndim(labels) == 0 else len(labels), np.int64)
        return task.sample(labels, rng, g, s, n, progress)
    cond = "class" if task.null_class is not None else "none"
    return Generator(cond, fn, task.data.class_names, task.sampling_defaults(), meta, source, extras)


def load_generator(path=None):
    """A Generator from an exported model, a checkpoint (EMA weights), a run folder, or None (the default model)."""
    from .checkpoints import load_model_file, split_prefixed
    from .recipes import validate
    from .task import make_task
    path = resolve_model_path(path)
    mf = load_model_file(path)
    if mf.kind == "pixel_ddpm":
        task = make_task(validate(mf.meta["recipe"]), load_data=False)
        task.unet.params.load_state_dict(mf.params(task.unet.prefix).data)
        return _task_generator(task, mf.meta, path, mf)
    if mf.kind == "sd":
        return sd_generator(path, mf)
    if mf.kind == "checkpoint":
        recipe = validate(mf.meta["recipe"])
        if recipe["task"] not in ("pixel_ddpm", "latent_ddpm"):
            raise UserError(f"{path} is a checkpoint of a {recipe['task']} recipe; sampling needs a diffusion model "
                            f"(pixel_ddpm or latent_ddpm)")
        frozen = None
        if mf.meta.get("frozen_meta"):
            frozen = {"tensors": split_prefixed(mf.tensors, "frozen/"), "meta": mf.meta["frozen_meta"]}
        task = make_task(recipe, load_data=False, frozen=frozen, task_state=mf.meta.get("task_state"))
        src = "ema/shadow." if any(k.startswith("ema/shadow.") for k in mf.tensors) else "model/"
        for P in task.trainable():
            P.load_state_dict({k: np.array(mf.tensors[src + k], dtype=np.float32) for k in P.keys()})
        meta = dict(task.export_meta(), recipe=recipe)
        return _task_generator(task, meta, path, None)
    raise UserError(f"{path} is a {mf.kind} model; minisd sample/eval generate with a diffusion model "
                    f"(pixel_ddpm or a text-to-image SD such as the default model)")


def sd_generator(path, mf):
    """A text-to-image Generator from a minisd StableDiffusion file (the shipped default model, mnist_ldm runs)."""
    from ..sdmodel import load_minisd
    sd = load_minisd(path)
    meta = mf.meta
    enc = sd.text_encoder
    if sd.vae.config.downsample_factor * sd.sample_size > 256:
        raise UserError(f"{path} is a full-size Stable Diffusion; use `minisd txt2img` for it")

    def hidden(prompts):
        return enc.forward(sd.tokenizer(list(prompts)))[0]
    null = hidden([""])[0]
    latent_shape = (sd.unet.config.in_channels, sd.sample_size, sd.sample_size)

    def fn(prompts, rng, g, s, n, progress):
        return sample_text(sd.unet, hidden, null, sd.vae.decode_latents, sd.scheduler, latent_shape, prompts, rng,
                           g, s, n, progress)
    names = meta.get("class_names") or [str(i) for i in range(10)]
    return Generator("text", fn, names, _defaults(meta), meta, path, mf)
