"""txt2img and img2img: prompt -> text embeddings -> denoising loop over latents -> VAE decode -> PIL images.

Semantics follow diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline step for step, so that with the
same weights and the same initial noise both produce the same image:
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/pipelines/stable_diffusion/
    pipeline_stable_diffusion.py, pipeline_stable_diffusion_img2img.py

  1. prompts: tokenized to 77 ids; the text encoder runs ONCE on [negative prompts; prompts] (N_p each); the
     embeddings are repeated num_images times per prompt (prompt-major: p0, p0, p1, p1, ...).
  2. sampler.set_timesteps(S). txt2img: latents = noise * sampler.init_noise_sigma (also for user-given latents:
     diffusers scales them too). img2img: init = min(int(S * strength), S) steps are run, the last `init` of the
     S timesteps; latents = sampler.add_noise(scale_factor * VAE.encode(image).sample(), noise, first timestep).
  3. each step: x_in = scale_model_input([x, x]) -> U-Net on the batch [uncond, cond] (2N) -> eps_u, eps_c ->
     eps = eps_u + w (eps_c - eps_u) (Ho & Salimans 2022, arXiv 2207.12598); guidance w <= 1 switches CFG off (one
     U-Net batch of N, no negative prompt). guidance_rescale phi > 0 (Lin et al. 2023, arXiv 2305.08891 §3.4):
     eps <- phi eps (std(eps_c) / std(eps)) + (1 - phi) eps, std over all but the batch axis, unbiased like torch.
     -> x = sampler.step(eps, t, x).
  4. image = VAE.decode(x / scale_factor), one image at a time (the decoder's activations are the largest of the
     run), optionally tiled; pixels = round(255 clamp(image / 2 + 0.5)) (minisd/image.py).

Shapes: latents (N, C, H/f, W/f) with f = model.vae_scale_factor (8 for SD), text embeddings (N, 77, D).
Memory: the U-Net runs with keep_cache=False (no activations kept), attention is bounded by the op itself.
Randomness is explicit: seed or rng for the initial noise, the VAE posterior sample and stochastic samplers; or
pass the arrays themselves (latents=, encode_noise=, noise=) to reproduce another implementation exactly.
"""
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .backend import to_numpy, xp_of
from .diffusion import SAMPLERS, make_sampler
from .errors import UserError
from .image import from_pil, to_pil

SAMPLER_NAMES = tuple(SAMPLERS)  # ddpm, ddim, pndm, euler, euler_a, lms, dpmpp_2m

# Defaults of diffusers' scheduler classes where they differ from SchedulerConfig's (which are DDPM/DDIM's). A
# setting the checkpoint's scheduler config does not state (model.scheduler_unset) takes the *chosen* sampler's
# default, as `EulerDiscreteScheduler.from_config(pipe.scheduler.config)` does in diffusers (configuration_utils
# drops `_use_default_values`): e.g. SD 1.5's config names no timestep_spacing, so DDIM/PNDM use "leading" and
# Euler / DPM-Solver "linspace".
SAMPLER_DEFAULTS = {"ddpm": {}, "ddim": {}, "pndm": {"set_alpha_to_one": False},
                    "euler": {"timestep_spacing": "linspace"}, "euler_a": {"timestep_spacing": "linspace"},
                    "lms": {"timestep_spacing": "linspace"}, "dpmpp_2m": {"timestep_spacing": "linspace"}}


@dataclass
class Result:
    """What a pipeline call returns: PIL images, the final latents (N, C, h, w) and the parameters used."""
    images: list
    latents: np.ndarray
    parameters: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# checks

def size_multiple(model):
    """Image sides must be multiples of this: the VAE's factor times the U-Net's (8 x 8 = 64 for SD)."""
    return model.vae_scale_factor * model.unet.config.downsample_factor


def check_size(model, height, width):
    m = size_multiple(model)
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, (int, np.integer)) or v <= 0 or v % m:
            raise UserError(f"{name} must be a positive multiple of {m} for this model (the VAE divides by "
                            f"{model.vae_scale_factor}, the U-Net by {model.unet.config.downsample_factor} more), "
                            f"got {v}")


def _prompts(prompt, what="prompt"):
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise UserError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")


def _sampler(model, name, karras, eta):
    name = name or getattr(model, "default_sampler", None) or "ddim"
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    unset = getattr(model, "scheduler_unset", ())
    config = dataclasses.replace(model.scheduler, **{k: v for k, v in SAMPLER_DEFAULTS.get(name, {}).items()
                                                     if k in unset})
    if config.prediction_type != model.prediction_type:  # the model's own setting wins (e.g. --prediction-type)
        config = dataclasses.replace(config, prediction_type=model.prediction_type)
    try:
        kwargs = {"eta": eta} if name == "ddim" and eta else {}
        return name, make_sampler(name, config, karras=karras, **kwargs)
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# the stages

def encode_prompts(model, prompts, negative, num_images, cfg):
    """-> context (2N or N, 77, D): [uncond x N; cond x N] with CFG. The text encoder runs once."""
    tok = model.tokenizer
    ids = tok(prompts)  # (N_p, 77)
    if cfg:
        ids = np.concatenate([tok(negative), ids], axis=0)  # (2 N_p, 77): negative prompts first
    hidden, _ = model.text_encoder.forward(ids)  # (2 N_p, 77, D)
    hidden = np.repeat(hidden, num_images, axis=0) if num_images > 1 else hidden  # prompt-major, as diffusers
    return hidden


def _negatives(negative_prompt, n):
    if negative_prompt is None:
        return [""] * n
    neg = _prompts(negative_prompt, "negative_prompt")
    if len(neg) == 1 and n > 1:
        neg = neg * n
    if len(neg) != n:
        raise UserError(f"negative_prompt has {len(neg)} entries for {n} prompts")
    return neg


def guide(out, guidance, guidance_rescale):
    """Classifier-free guidance on a U-Net output batch [uncond; cond] (2N, ...) -> (N, ...)."""
    N = out.shape[0] // 2
    u, c = out[:N], out[N:]
    eps = u + guidance * (c - u)
    if guidance_rescale > 0:
        axes = tuple(range(1, out.ndim))
        std_c = c.std(axis=axes, keepdims=True, ddof=1)  # torch.std is unbiased: ddof=1 to match diffusers
        std_e = eps.std(axis=axes, keepdims=True, ddof=1)
        eps = guidance_rescale * (eps * (std_c / std_e)) + (1 - guidance_rescale) * eps
    return eps.astype(out.dtype, copy=False)


def denoise(model, sampler, latents, timesteps, context, guidance, guidance_rescale=0.0, rng=None, callback=None,
            progress=True, desc="denoising"):
    """The sampling loop: latents (N, C, h, w) at timesteps[0] -> latents at the end of the schedule."""
    from tqdm.auto import tqdm
    xp = xp_of(latents)
    cfg = guidance > 1
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        x_in = xp.concatenate([latents, latents], axis=0) if cfg else latents  # (2N, C, h, w): [uncond, cond]
        x_in = sampler.scale_model_input(x_in, t)
        out, _ = model.unet.forward(x_in, t, context)  # keep_cache=False: inference keeps no activations
        eps = guide(out, guidance, guidance_rescale) if cfg else out
        latents = sampler.step(eps, t, latents, rng=rng)
        if callback is not None:
            callback(i, t, latents)
    return latents


def decode(model, latents, vae_tile=None):
    """Latents (N, C, h, w) -> images (N, 3, H, W) in about [-1, 1], one image at a time."""
    imgs = [to_numpy(model.vae.decode_latents(latents[i:i + 1], tile=vae_tile)) for i in range(latents.shape[0])]
    return np.concatenate(imgs, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# the two pipelines

def _common(model, prompt, negative_prompt, steps, sampler, karras, guidance, num_images, seed, rng, eta):
    if getattr(model.unet.config, "in_channels", 4) != model.vae.config.embed_dim:
        raise UserError(f"this is an inpainting model (the U-Net takes {model.unet.config.in_channels} channels: "
                        f"latents + mask + masked image); txt2img and img2img need a regular model")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise UserError(f"num_images must be a positive integer, got {num_images!r}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise UserError(f"guidance must be a number, got {guidance!r}") from None
    prompts = _prompts(prompt)
    name, smp = _sampler(model, sampler, karras, eta)
    if rng is None:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2 ** 32)  # recorded in the result, so it can be rerun
        rng = np.random.default_rng(seed)
    return prompts, _negatives(negative_prompt, len(prompts)), name, smp, guidance, rng, seed


def _xp(model):
    return xp_of(next(iter(model.unet.params.data.values())))


def txt2img(model, prompt, negative_prompt=None, steps=50, sampler=None, karras=False, guidance=7.5,
            guidance_rescale=0.0, height=None, width=None, num_images=1, seed=None, rng=None, latents=None,
            eta=0.0, callback=None, progress=True, vae_tile=None):
    """Generate images from text.

    prompt: str or list of str (a batch); negative_prompt: str or one per prompt (default ""). steps: S.
    sampler: ddpm | ddim | pndm | euler | euler_a | lms | dpmpp_2m (default: the checkpoint's). karras: Karras
    sigmas. guidance: CFG scale w (<= 1: no CFG). guidance_rescale: phi in [0, 1]. height, width: pixels (default:
    the model's sample size). num_images: per prompt. seed / rng: randomness (rng wins). latents: initial latents
    (N, C, H/f, W/f), N = prompts x num_images, used as is before the init_noise_sigma scaling. eta: DDIM noise.
    callback(step, t, latents) after every step. vae_tile: decode in tiles of this many latent pixels.
    Returns Result(images=[PIL], latents, parameters).
    """
    prompts, negs, name, smp, guidance, rng, seed = _common(model, prompt, negative_prompt, steps, sampler, karras,
                                                             guidance, num_images, seed, rng, eta)
    f = model.vae_scale_factor
    C = model.unet.config.in_channels
    N = len(prompts) * num_images
    if latents is not None:
        latents = np.asarray(to_numpy(latents))
        if latents.ndim != 4 or latents.shape[0] != N or latents.shape[1] != C:
            raise UserError(f"latents must have shape ({N}, {C}, H/{f}, W/{f}) for {len(prompts)} prompt(s) x "
                            f"{num_images} image(s), got {latents.shape}")
        if not np.all(np.isfinite(latents)):
            raise UserError("latents contain NaN or infinity")
        if height is None and width is None:
            height, width = latents.shape[2] * f, latents.shape[3] * f
    height = height if height is not None else model.sample_size * f
    width = width if width is not None else model.sample_size * f
    check_size(model, height, width)
    shape = (N, C, height // f, width // f)
    if latents is not None and latents.shape != shape:
        raise UserError(f"latents have shape {latents.shape} but {height}x{width} pixels need {shape}")
    xp = _xp(model)
    cfg = guidance > 1
    context = encode_prompts(model, prompts, negs, num_images, cfg)
    smp.set_timesteps(steps)  # before the noise: init_noise_sigma depends on the timesteps (sigma samplers)
    if latents is None:
        latents = rng.standard_normal(shape, dtype=np.float32)
    latents = xp.asarray(latents.astype(np.float32) * np.float32(smp.init_noise_sigma))
    latents = denoise(model, smp, latents, smp.timesteps, context, guidance, guidance_rescale, rng, callback,
                      progress)
    images = to_pil(decode(model, latents, vae_tile))
    params = dict(mode="txt2img", prompt=prompts[0] if len(prompts) == 1 else prompts,
                  negative_prompt=negs[0] if len(set(negs)) == 1 else negs, steps=steps, sampler=name,
                  karras=bool(karras), guidance=guidance, guidance_rescale=guidance_rescale, seed=seed,
                  width=width, height=height, model=getattr(model, "name", ""), num_images=num_images)
    return Result(images, to_numpy(latents), params)


def img2img(model, prompt, image, strength=0.8, negative_prompt=None, steps=50, sampler=None, karras=False,
            guidance=7.5, guidance_rescale=0.0, height=None, width=None, num_images=1, seed=None, rng=None,
            encode_noise=None, noise=None, eta=0.0, callback=None, progress=True, vae_tile=None):
    """Transform an image guided by text (SDEdit, as diffusers' img2img).

    image: a PIL image, a path, or an array (N_img, C, H, W) in [-1, 1] (N_img = 1 or one per output image).
    strength in [0, 1]: the fraction of the S steps run (1: start from pure noise at the first timestep; 0: no
    denoising, the image is just encoded and decoded). height/width: resize the image (default: its own size,
    which must then be a multiple of size_multiple(model)). encode_noise: the standard normal noise of the VAE
    posterior sample (N_img, C, h, w); noise: the noise added at the start timestep (N, C, h, w); both drawn from
    rng (in that order, as diffusers draws them from its generator) when not given. Other arguments as txt2img.
    """
    try:
        strength = float(strength)
    except (TypeError, ValueError):
        raise UserError(f"strength must be a number in [0, 1], got {strength!r}") from None
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be in [0, 1], got {strength}")
    prompts, negs, name, smp, guidance, rng, seed = _common(model, prompt, negative_prompt, steps, sampler, karras,
                                                             guidance, num_images, seed, rng, eta)
    channels = model.vae.config.in_channels
    if isinstance(image, np.ndarray) or hasattr(image, "__cuda_array_interface__"):
        x = np.asarray(to_numpy(image), dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != channels:
            raise UserError(f"image array must be (N, {channels}, H, W) in [-1, 1], got {x.shape}")
        if height is not None or width is not None:
            if (height, width) != tuple(x.shape[2:]):
                raise UserError(f"image array is {x.shape[2]}x{x.shape[3]}; resize it or pass a PIL image")
    else:
        x = from_pil(image, width, height, channels)
        if (height is None) != (width is None):
            raise UserError("give both height and width, or neither (then the image's own size is used)")
    height, width = x.shape[2], x.shape[3]
    check_size(model, height, width)
    N = len(prompts) * num_images
    if N % x.shape[0]:
        raise UserError(f"{x.shape[0]} images cannot be spread over {N} outputs")
    xp = _xp(model)
    cfg = guidance > 1
    context = encode_prompts(model, prompts, negs, num_images, cfg)

    smp.set_timesteps(steps)
    init = min(int(steps * strength), steps)  # diffusers' get_timesteps
    t_start = max(steps - init, 0)
    timesteps = smp.timesteps[t_start:]  # every sampler here has order 1 (diffusers: t_start * scheduler.order)
    if hasattr(smp, "set_begin_index"):
        smp.set_begin_index(t_start)

    post, _ = model.vae.encode(xp.asarray(x))
    if encode_noise is None:
        encode_noise = rng.standard_normal(post.mean.shape, dtype=np.float32)
    encode_noise = np.asarray(to_numpy(encode_noise), dtype=np.float32)
    if encode_noise.shape != tuple(post.mean.shape):
        raise UserError(f"encode_noise must have shape {tuple(post.mean.shape)}, got {encode_noise.shape}")
    z = post.sample(noise=xp.asarray(encode_noise))  # mean + std * noise
    x0 = np.float32(model.vae.config.scale_factor) * z
    if x0.shape[0] != N:
        x0 = xp.concatenate([x0] * (N // x0.shape[0]), axis=0)  # (N, C, h, w), as diffusers duplicates images
    if len(timesteps) == 0:  # strength 0: nothing to denoise
        latents = x0
    else:
        if noise is None:
            noise = rng.standard_normal(x0.shape, dtype=np.float32)
        noise = np.asarray(to_numpy(noise), dtype=np.float32)
        if noise.shape != tuple(x0.shape):
            raise UserError(f"noise must have shape {tuple(x0.shape)}, got {noise.shape}")
        latents = smp.add_noise(x0, xp.asarray(noise), timesteps[0])
        latents = denoise(model, smp, latents, timesteps, context, guidance, guidance_rescale, rng, callback,
                          progress)
    images = to_pil(decode(model, latents, vae_tile))
    params = dict(mode="img2img", prompt=prompts[0] if len(prompts) == 1 else prompts,
                  negative_prompt=negs[0] if len(set(negs)) == 1 else negs, steps=steps, sampler=name,
                  karras=bool(karras), guidance=guidance, guidance_rescale=guidance_rescale, seed=seed,
                  width=width, height=height, strength=strength, model=getattr(model, "name", ""),
                  num_images=num_images)
    return Result(images, to_numpy(latents), params)


def use_device(model, device):
    """Put the model's weights on `device` ("cpu" or "cuda"). cuda needs CuPy and an NVIDIA GPU (UserError
    otherwise); the GPU kernels live in minisd/cuda/ (the hot ops hand over there when given CuPy arrays)."""
    if device in (None, "cpu"):
        return model
    if device != "cuda":
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # ImportError, or CUDA driver/runtime errors of any kind
        raise UserError(f"--device cuda needs CuPy and an NVIDIA GPU: pip install cupy-cuda13x (and an NVIDIA "
                        f"driver); CuPy said: {type(e).__name__}: {e}") from None
    if n < 1:
        raise UserError("--device cuda needs CuPy and an NVIDIA GPU: pip install cupy-cuda13x; CuPy found no GPU")
    for part in model.parts().values():
        part.params.to(cupy)
    return model


def default_size(model):
    """(height, width) in pixels the model was trained for."""
    s = model.sample_size * model.vae_scale_factor
    return s, s
