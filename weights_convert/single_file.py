"""Original single-file Stable Diffusion checkpoints (LDM layout, `.ckpt` / `.pth` / `.safetensors`) -> a minisd
`StableDiffusion`.

minisd's parameters *are* the LDM keys (style.md principle 7), so loading is: read the tensors, pick the state dict
out of its wrapper, drop what is not a weight, optionally swap in the EMA weights, infer each part's config from
the shapes, and hand the arrays over unchanged (no renames, no copies: memory-mapped arrays stay mapped).

What a file may hold (sd-reference.md §2.1):
  * a Lightning checkpoint {"state_dict": {...}, "global_step": 470000, "epoch": ..., ...}; community files are
    also flat ({key: tensor}) or doubly wrapped ({"state_dict": {"state_dict": ...}}); .safetensors files are flat.
  * U-Net `model.diffusion_model.*`, VAE `first_stage_model.*`, text encoder `cond_stage_model.transformer.*`
    (SD 1.x, CLIP-L in Hugging Face names) or `cond_stage_model.model.*` (SD 2.x, OpenCLIP-H names).
  * EMA shadow weights `model_ema.<U-Net key without "model." and without dots>` (LDM's LitEma), plus
    `model_ema.decay` and `model_ema.num_updates`: extract_ema=True uses them for the U-Net (diffusers'
    `--extract_ema`); by default the regular weights are used, as diffusers does.
  * DDPM schedule buffers (betas, alphas_cumprod, ...; rebuilt from the scheduler config instead), the
    `position_ids` buffer of HF CLIP (0..76, implied by the model) and LDM's `logvar`: ignored.
  * float32, float16 (kept as float16 storage, computed in float32) or bfloat16 (decoded to float32 by the
    readers).

Heads and activations are not visible in shapes. We follow the models SD was released with: the SD 1.x U-Net has
8 heads, the SD 2.x U-Net heads of 64 channels (diffusers' converter decides the same by the 1024-wide context);
CLIP-L and OpenCLIP-H both use heads of 64 channels, CLIP-L quick_gelu, OpenCLIP-H exact GELU and the penultimate
layer. Scheduler settings are those of the released diffusers configs (SD 1.5: PNDM; SD 2.1: DDIM), with SD 2.x
eps-vs-v decided from `global_step` as diffusers does (detect.py).

References:
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/loaders/single_file_utils.py
    (infer_diffusers_model_type, convert_ldm_unet_checkpoint's EMA handling, _legacy_load_scheduler)
  https://github.com/CompVis/stable-diffusion/blob/21f890f9/ldm/modules/ema.py (LitEma key names)
"""
import dataclasses
import warnings
from pathlib import Path

import numpy as np

from minisd.diffusion.schedule import SD15_SCHEDULER, SchedulerConfig
from minisd.errors import UserError
from minisd.io import safetensors
from minisd.models import clip as clip_model
from minisd.models import unet as unet_model
from minisd.models import vae as vae_model
from minisd.nn import Params
from minisd.sdmodel import StableDiffusion
from minisd.tokenizer import CLIPTokenizer

from . import detect as det
from .torch_zip import load_torch_file

# LDM's DDPM buffers (ldm/models/diffusion/ddpm.py register_schedule) and other non-weights found in SD files
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay",
                    "model_ema.num_updates"}
PARTS = (det.UNET, det.VAE, det.CLIP_HF, det.CLIP_OPENCLIP)
# The settings the released diffusers scheduler configs state (stable-diffusion-v1-5 and stable-diffusion-2-1
# scheduler_config.json, which diffusers' from_single_file uses); the others take the chosen sampler's defaults.
SD_SCHEDULER_STATED = {"beta_end", "beta_schedule", "beta_start", "num_train_timesteps", "set_alpha_to_one",
                       "skip_prk_steps", "steps_offset", "trained_betas", "clip_sample", "prediction_type"}
SD_SCHEDULER_UNSET = frozenset(f.name for f in dataclasses.fields(SchedulerConfig)) - SD_SCHEDULER_STATED
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------------------------------------------
# reading

def read_checkpoint(path):
    """path (.safetensors or a torch.save file) -> (tensors {key: array}, global_step or None).

    Unwraps {"state_dict": ...} as often as it is nested (keeping the outermost global_step). Tensors are
    memory-mapped where the format allows. Errors are UserErrors that name the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors.load(path), None
    obj = load_torch_file(path)  # restricted unpickler: never runs code from the file
    global_step = None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if global_step is None and "global_step" in obj:
            global_step = _as_int(obj["global_step"])
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors; "
                        f"is it a model checkpoint?")
    if global_step is None and "global_step" in obj:
        global_step = _as_int(obj["global_step"])
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    if not tensors:
        raise UserError(f"{path}: contains no tensors (top-level entries: {list(obj)[:8]}); is it a model "
                        f"checkpoint?")
    return tensors, global_step


def _as_int(v):
    try:
        return int(np.asarray(v))
    except (TypeError, ValueError):
        return None


def select_weights(tensors, extract_ema=False, what="checkpoint"):
    """The weights minisd loads: the U-Net / VAE / text-encoder tensors, EMA swapped in when asked, everything
    else (schedule buffers, position_ids, EMA shadows, unknown extras) dropped. Returns a new dict (same arrays)."""
    ema_keys = [k for k in tensors if k.startswith("model_ema.") and k not in SCHEDULE_BUFFERS]
    out = {}
    for k, v in tensors.items():
        if k in SCHEDULE_BUFFERS or k.startswith("model_ema.") or k.endswith(".position_ids"):
            continue
        if k.startswith(PARTS):
            out[k] = v
    if extract_ema:
        if not ema_keys:
            raise UserError(f"{what}: --extract-ema was asked for, but the file has no EMA weights (model_ema.*); "
                            f"it is probably an EMA-only file already: load it without --extract-ema")
        missing = []
        for k in [k for k in out if k.startswith(det.UNET)]:
            flat = "model_ema." + "".join(k.split(".")[1:])  # LitEma: dots removed, "model." dropped
            if flat in tensors:
                out[k] = tensors[flat]
            else:
                missing.append(flat)
        if missing:
            raise UserError(f"{what}: the EMA weights are incomplete: {len(missing)} U-Net tensors have no "
                            f"EMA copy (first: {missing[0]}); load without --extract-ema")
    extra = [k for k in tensors if k not in out and not k.startswith("model_ema.") and k not in SCHEDULE_BUFFERS
             and not k.endswith(".position_ids")]
    if extra:
        warnings.warn(f"{what}: ignoring {len(extra)} tensors that are not part of an SD 1.x/2.x model "
                      f"(first: {extra[:3]})")
    return out


# ----------------------------------------------------------------------------------------------------------------
# building the model

def _sub(tensors, prefix, dtype):
    return Params({k: v for k, v in tensors.items() if k.startswith(prefix)}, compute_dtype=dtype)


def text_encoder_overrides(width, layout):
    """Head count and activation for a text encoder of `width`: CLIP-L (768) and OpenCLIP-H (1024) are known to
    clip.config_from_shapes; other widths (tiny test models) follow the same rule: heads of 64 channels,
    quick_gelu in the CLIP-L (hf) layout, exact GELU in the OpenCLIP layout."""
    if width in (768, 1024):
        return {}
    if width % 64:
        raise UserError(f"text encoder of width {width}: cannot infer its head count (not a multiple of 64); "
                        f"convert it from a diffusers folder, whose config.json states it")
    return {"num_attention_heads": width // 64, "hidden_act": "quick_gelu" if layout == "hf" else "gelu"}


def build_model(tensors, info, dtype=np.float32, name="", what="checkpoint"):
    """{LDM key: array} (already selected) + CheckpointInfo -> StableDiffusion."""
    try:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        heads = {"num_head_channels": 64} if info.family == "sd2" else {"num_heads": 8}
        unet_p = _sub(tensors, det.UNET, dtype)
        ucfg = unet_model.config_from_shapes(unet_p.shapes(), **heads)
        vae_p = _sub(tensors, det.VAE, dtype)
        vcfg = vae_model.config_from_shapes(vae_p.shapes())
        prefix = det.CLIP_OPENCLIP if info.text_layout == "openclip" else det.CLIP_HF
        clip_p = _sub(tensors, prefix, dtype)
        tok_key = prefix + ("token_embedding.weight" if info.text_layout == "openclip"
                            else "text_model.embeddings.token_embedding.weight")
        if tok_key not in shapes:
            raise UserError(f"{what}: the text encoder has no token embedding ({tok_key})")
        width = shapes[tok_key][1]
        tcfg = clip_model.config_from_shapes(clip_p.shapes(), **text_encoder_overrides(width, info.text_layout))
        unet = unet_model.UNet(ucfg, params=unet_p, dtype=dtype)
        vae = vae_model.VAE(vcfg, params=vae_p, dtype=dtype)
        text = clip_model.CLIPTextModel(tcfg, params=clip_p, dtype=dtype)
    except ValueError as e:
        raise UserError(f"{what}: the {info.name} weights do not fit the architecture: {e}") from None
    tokenizer = CLIPTokenizer.sd2() if info.family == "sd2" else CLIPTokenizer.sd1()
    scheduler = dataclasses.replace(SD15_SCHEDULER, prediction_type=info.prediction_type)
    model = StableDiffusion(unet, vae, text, tokenizer, scheduler, info.prediction_type, info.sample_size,
                            name=name or info.name, notes=f"converted from an LDM single file ({info.name})")
    # The sampler the released diffusers configs name: PNDM (SD 1.5), DDIM (SD 2.1). Not stored by save().
    model.default_sampler = "ddim" if info.family == "sd2" else "pndm"
    model.scheduler_unset = SD_SCHEDULER_UNSET
    return model


def load_single_file(path, extract_ema=False, dtype=np.float32, prediction_type=None):
    """An LDM single-file checkpoint -> (StableDiffusion, CheckpointInfo). See the module docstring.
    prediction_type: "epsilon" | "v_prediction" to override the detection (SD 2.x files without a global_step
    are taken as v-prediction, as diffusers does; the 512-base model is epsilon)."""
    path = Path(path)
    tensors, global_step = read_checkpoint(path)
    info = det.detect({k: tuple(v.shape) for k, v in tensors.items()}, global_step, what=str(path))
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")
        info = dataclasses.replace(info, prediction_type=prediction_type)
    weights = select_weights(tensors, extract_ema=extract_ema, what=str(path))
    model = build_model(weights, info, dtype=dtype, name=path.stem, what=str(path))
    return model, info
