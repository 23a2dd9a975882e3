"""diffusers folders (the layout `StableDiffusionPipeline.save_pretrained` writes) -> a minisd `StableDiffusion`.

    model_index.json                       pipeline class (checked: SDXL, SD3, FLUX ... are refused by name)
    unet/config.json + diffusion_pytorch_model[.fp16].safetensors | .bin | .safetensors.index.json (sharded)
    vae/config.json  + diffusion_pytorch_model[.fp16].safetensors | ...
    text_encoder/config.json + model[.fp16].safetensors | pytorch_model[.fp16].bin | model.safetensors.index.json
    tokenizer/       special_tokens_map.json (pad token: SD 1.x "<|endoftext|>", SD 2.x "!"), added_tokens.json
    scheduler/scheduler_config.json        (+ its `_class_name`, which names the default sampler)

Each part's config.json is translated to minisd's config (LDM field names), the tensors are renamed to LDM keys
with the one rename table (names.py, inverted here), and the VAE attention projections, Linear (C, C) in diffusers
files, are viewed as the LDM 1x1 convs (C, C, 1, 1). Settings minisd does not implement (SDXL's added
embeddings, other block types, scale-shift norms, ...) are refused by name rather than silently ignored.

The SD 2.x text encoder of a diffusers folder is already cut to the 23 layers SD 2.x uses (diffusers drops
OpenCLIP's last layer and the projection), in Hugging Face layout: it is kept as is (layout "hf", clip_skip 0),
so it computes exactly what the 24-layer OpenCLIP model with clip_skip 1 computes.

References:
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/utils/constants.py (file names)
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/utils/hub_utils.py (_add_variant)
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/models/unets/unet_2d_condition.py (config)
  https://github.com/huggingface/diffusers/blob/58eb52c0/src/diffusers/models/autoencoders/autoencoder_kl.py
  https://github.com/huggingface/transformers/blob/v4.40.0/src/transformers/models/clip/configuration_clip.py
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from minisd.diffusion.schedule import SchedulerConfig
from minisd.errors import UserError
from minisd.io import safetensors
from minisd.models import clip as clip_model
from minisd.models import unet as unet_model
from minisd.models import vae as vae_model
from minisd.nn import Params
from minisd.pipeline import SAMPLER_DEFAULTS
from minisd.sdmodel import StableDiffusion
from minisd.tokenizer import CLIPTokenizer

from . import detect as det
from . import names
from .torch_zip import load_torch_file

SD1_PAD, SD2_PAD = 49407, 0  # "<|endoftext|>" and "!" in the CLIP vocabulary

# diffusers scheduler class -> minisd sampler name (the default sampler of a folder)
SAMPLER_OF_CLASS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                    "EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                    "LMSDiscreteScheduler": "lms", "DPMSolverMultistepScheduler": "dpmpp_2m"}
# class defaults that differ from SchedulerConfig's: a config that leaves them out gets these, as
# `SchedulerClass.from_config(d)` would (pipeline.SAMPLER_DEFAULTS, keyed by class name here)
CLASS_DEFAULTS = {cls: SAMPLER_DEFAULTS[name] for cls, name in SAMPLER_OF_CLASS.items()}

# UNet2DConditionModel settings minisd implements only at one value: {key: accepted value}
UNET_FIXED = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
              "downsample_padding": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
              "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "conv_in_kernel": 3,
              "conv_out_kernel": 3, "dual_cross_attention": False, "class_embed_type": None,
              "addition_embed_type": None, "time_cond_proj_dim": None, "encoder_hid_dim": None,
              "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default", "timestep_post_act": None,
              "time_embedding_dim": None, "time_embedding_act_fn": None, "projection_class_embeddings_input_dim":
                  None, "class_embeddings_concat": False, "cross_attention_norm": None, "dropout": 0.0,
              "reverse_transformer_layers_per_block": None, "resnet_skip_time_act": False,
              "resnet_out_scale_factor": 1.0, "mid_block_only_cross_attention": None}
VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": None,
             "latents_mean": None, "latents_std": None, "mid_block_add_attention": True}


# ----------------------------------------------------------------------------------------------------------------
# files

def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what}: missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _weight_candidates(base, bin_base, variant):
    v = "" if variant is None else f".{variant}"
    return [f"{base}{v}.safetensors", f"{base}.safetensors.index{v}.json", f"{bin_base}{v}.bin",
            f"{bin_base}.bin.index{v}.json"]


def find_weights(folder, base, bin_base, variant=None):
    """The weight file (or shard index) of one component folder. variant None: the plain (fp32) files, falling
    back to the fp16 variant when only that exists; "fp16": the fp16 variant only."""
    variants = [variant] if variant is not None else [None, "fp16"]
    for v in variants:
        for name in _weight_candidates(base, bin_base, v):
            if (folder / name).is_file():
                return folder / name
    tried = ", ".join(_weight_candidates(base, bin_base, variants[0]))
    raise UserError(f"{folder}: no weights found (looked for {tried}"
                    f"{' and the fp16 variants' if variant is None else ''})")


def read_weights(path):
    """{name: array} from a .safetensors / torch .bin file or a sharded *.index.json (weight_map name -> shard)."""
    path = Path(path)
    if path.name.endswith(".json"):
        index = _read_json(path, str(path))
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{path}: a shard index needs a non-empty 'weight_map' {{tensor name: shard file}}")
        out = {}
        for shard in dict.fromkeys(weight_map.values()):  # each shard once, in order of first use
            shard_path = path.parent / shard
            if not shard_path.is_file():
                raise UserError(f"{path}: shard {shard} is listed but missing; re-download the model")
            part = read_weights(shard_path)
            out.update({k: v for k, v in part.items() if weight_map.get(k) == shard})
        missing = [k for k in weight_map if k not in out]
        if missing:
            raise UserError(f"{path}: {len(missing)} tensors listed in the index are not in their shards "
                            f"(first: {missing[0]})")
        return out
    if path.suffix == ".safetensors":
        return safetensors.load(path)
    obj = load_torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


# ----------------------------------------------------------------------------------------------------------------
# configs: diffusers/transformers config.json -> minisd configs

def _check_fixed(cfg, fixed, what):
    for key, want in fixed.items():
        if key not in cfg:
            continue
        got = cfg[key]
        if isinstance(got, list) and not isinstance(want, list):  # per-block lists, e.g. only_cross_attention
            got = got[0] if len(set(map(str, got))) == 1 else got
        same = got == want if not isinstance(want, float) else isinstance(got, (int, float)) and abs(got - want) < 1e-12
        if not same:
            if key == "addition_embed_type" and got == "text_time":
                raise UserError(f"{what}: unsupported: SDXL (addition_embed_type 'text_time'). minisd runs Stable "
                                f"Diffusion 1.x and 2.x only")
            raise UserError(f"{what}: {key}={got!r} is not supported by minisd (only {want!r}); this is not an "
                            f"SD 1.x/2.x U-Net or VAE")


def _per_level(v, n, key, what):
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise UserError(f"{what}: {key} has {len(v)} entries for {n} levels")
        return list(v)
    return [v] * n


def unet_config(cfg, what="unet/config.json"):
    """UNet2DConditionModel config dict -> UNetConfig (LDM field names)."""
    _check_fixed(cfg, UNET_FIXED, what)
    oca = cfg.get("only_cross_attention", False)
    if any(oca) if isinstance(oca, list) else oca:
        raise UserError(f"{what}: only_cross_attention is not supported by minisd")
    widths = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(widths)
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    if len(down) != n or len(up) != n:
        raise UserError(f"{what}: {len(down)} down and {len(up)} up blocks for {n} block_out_channels")
    for t in down + up:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise UserError(f"{what}: block type {t} is not supported by minisd (SD 1.x/2.x use CrossAttn*Block2D "
                            f"and Down/UpBlock2D)")
    attn = [t.startswith("CrossAttn") for t in down]
    if [t.startswith("CrossAttn") for t in reversed(up)] != attn:
        raise UserError(f"{what}: up_block_types do not mirror down_block_types; LDM's U-Net needs attention at the "
                        f"same levels on the way down and up")
    mc = widths[0]
    if any(w % mc for w in widths):
        raise UserError(f"{what}: block_out_channels {widths} are not multiples of the first")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # diffusers: "head_dim" = head count
    heads = _per_level(heads, n, "attention_head_dim", what)
    used = [i for i in range(n) if attn[i]] + [n - 1]  # the mid block uses the last level's setting
    if len({heads[i] for i in used}) == 1:
        num_heads, num_head_channels = heads[used[0]], -1
    else:
        dims = {widths[i] // heads[i] for i in used}
        if len(dims) != 1 or any(widths[i] % heads[i] for i in used):
            raise UserError(f"{what}: attention heads {heads} are neither one count nor one width per level")
        num_heads, num_head_channels = -1, dims.pop()
    depth = set(_per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", what))
    if len(depth) != 1:
        raise UserError(f"{what}: transformer_layers_per_block differs per level; minisd supports one depth")
    ctx = cfg.get("cross_attention_dim", 1280)
    if isinstance(ctx, (list, tuple)):
        if len(set(ctx)) != 1:
            raise UserError(f"{what}: cross_attention_dim differs per level; not supported")
        ctx = ctx[0]
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        raise UserError(f"{what}: layers_per_block per level is not supported")
    try:
        return unet_model.UNetConfig(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=mc,
            attention_resolutions=tuple(2 ** i for i in range(n) if attn[i]), num_res_blocks=lpb,
            channel_mult=tuple(w // mc for w in widths), num_heads=num_heads, num_head_channels=num_head_channels,
            transformer_depth=depth.pop(), context_dim=ctx,
            use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
            num_classes=cfg.get("num_class_embeds"), norm_num_groups=cfg.get("norm_num_groups", 32))
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def vae_config(cfg, what="vae/config.json"):
    """AutoencoderKL config dict -> VAEConfig."""
    _check_fixed(cfg, VAE_FIXED, what)
    widths = list(cfg.get("block_out_channels", (64,)))
    n = len(widths)
    for t in list(cfg.get("down_block_types", ["DownEncoderBlock2D"] * n)) + \
            list(cfg.get("up_block_types", ["UpDecoderBlock2D"] * n)):
        if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise UserError(f"{what}: block type {t} is not supported by minisd")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise UserError(f"{what}: block_out_channels {widths} are not multiples of the first")
    z = cfg.get("latent_channels", 4)
    try:
        return vae_model.VAEConfig(in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3), ch=ch,
                                   ch_mult=tuple(w // ch for w in widths),
                                   num_res_blocks=cfg.get("layers_per_block", 1), z_channels=z, embed_dim=z, norm_num_groups=cfg.get("norm_num_groups", 32),
                                   scale_factor=float(cfg.get("scaling_factor", 0.18215)))
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def text_config(cfg, has_projection, what="text_encoder/config.json"):
    """transformers CLIPTextConfig dict -> CLIPTextConfig (layout "hf", every layer used)."""
    if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise UserError(f"{what}: model_type {cfg.get('model_type')!r} is not a CLIP text model")
    if "text_config" in cfg:  # a full CLIPModel config: the text part
        cfg = cfg["text_config"]
    try:
        return clip_model.CLIPTextConfig(
            vocab_size=cfg.get("vocab_size", 49408), max_position_embeddings=cfg.get("max_position_embeddings", 77),
            hidden_size=cfg.get("hidden_size", 512), intermediate_size=cfg.get("intermediate_size", 2048),
            num_hidden_layers=cfg.get("num_hidden_layers", 12), num_attention_heads=cfg.get("num_attention_heads", 8),
            hidden_act=cfg.get("hidden_act", "quick_gelu"), layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            layout="hf", clip_skip=0, projection_dim=cfg.get("projection_dim", 512) if has_projection else None)
    except ValueError as e:
        raise UserError(f"{what}: {e}") from None


def scheduler_config(folder):
    """scheduler/scheduler_config.json -> (SchedulerConfig, default sampler name, the settings the file does not
    state). Missing file: SD 1.5's released settings."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        from .single_file import SD_SCHEDULER_UNSET
        from minisd.diffusion.schedule import SD15_SCHEDULER
        return SD15_SCHEDULER, "pndm", SD_SCHEDULER_UNSET
    d = _read_json(path, str(path))
    cls = d.get("_class_name", "")
    merged = dict(CLASS_DEFAULTS.get(cls, {}))
    merged.update(d)
    try:
        cfg = SchedulerConfig.from_dict(merged, strict=False)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    # diffusers treats keys listed in _use_default_values like absent ones (configuration_utils.extract_init_dict)
    unset = (frozenset(f.name for f in dataclasses.fields(SchedulerConfig)) - set(d)) | \
        frozenset(d.get("_use_default_values", ()))
    return cfg, SAMPLER_OF_CLASS.get(cls, "ddim"), unset


def tokenizer_for(folder, text_cfg):
    """A CLIPTokenizer with the folder's pad token and added tokens (textual inversion)."""
    tdir = folder / "tokenizer"
    pad_id = SD2_PAD if text_cfg.hidden_size == 1024 else SD1_PAD  # no tokenizer/ folder: by the model family
    if tdir.is_dir():
        pad = None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (tdir / name).is_file():
                pad = _read_json(tdir / name, str(tdir / name)).get("pad_token", pad)
                if pad is not None:
                    break
        if isinstance(pad, dict):
            pad = pad.get("content")
        if pad == "!":
            pad_id = SD2_PAD
        elif pad in ("<|endoftext|>", None):
            pad_id = SD1_PAD if pad is not None else pad_id
        else:
            raise UserError(f"{tdir}: pad token {pad!r} is neither SD 1.x's '<|endoftext|>' nor SD 2.x's '!'")
        vocab, added = None, {}
        if (tdir / "vocab.json").is_file():
            vocab = _read_json(tdir / "vocab.json", str(tdir / "vocab.json"))
        if (tdir / "tokenizer.json").is_file():  # the "fast" format (transformers >= 5 writes only this one)
            tj = _read_json(tdir / "tokenizer.json", str(tdir / "tokenizer.json"))
            vocab = (tj.get("model") or {}).get("vocab", vocab)
            added.update({t["content"]: int(t["id"]) for t in tj.get("added_tokens", []) if int(t["id"]) >= 49408})
        if vocab is not None and len(vocab) != 49408:
            raise UserError(f"{tdir}: the vocabulary has {len(vocab)} entries; minisd ships the 49,408-token CLIP "
                            f"vocabulary")
    else:
        added = {}
    tok = CLIPTokenizer(pad_id=pad_id)
    added_path = tdir / "added_tokens.json"
    if added_path.is_file():
        added.update({k: int(v) for k, v in _read_json(added_path, str(added_path)).items() if int(v) >= 49408})
    if added:
        order = sorted(added, key=added.get)
        got = tok.add_tokens(order)
        if got != [added[t] for t in order]:
            raise UserError(f"{tdir}: added tokens got ids {got}, the files say {[added[t] for t in order]}")
    return tok


# ----------------------------------------------------------------------------------------------------------------
# renaming

def _renamed(weights, ldm_to_diffusers, what, reshape=None):
    """{diffusers name: array} -> {LDM name: array} via the inverted table; exact key sets or UserError."""
    inv = {d: k for k, d in ldm_to_diffusers.items()}
    missing = [d for d in inv if d not in weights]
    unexpected = [d for d in weights if d not in inv]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
        raise UserError(f"{what}: the weights do not match config.json: {'; '.join(parts)}")
    out = {}
    for d, k in inv.items():
        a = weights[d]
        if reshape and k in reshape and a.ndim == 2:
            a = a.reshape(a.shape + (1, 1))  # Linear (C, C) -> LDM's 1x1 conv (C, C, 1, 1), a view
        out[k] = a
    return out


VAE_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def _vae_modern_names(weights):
    out = {}
    for k, v in weights.items():
        parts = k.rsplit(".", 2)
        if ".attentions." in k and len(parts) == 3 and parts[1] in VAE_LEGACY:
            k = f"{parts[0]}.{VAE_LEGACY[parts[1]]}.{parts[2]}"
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# the loader

def is_diffusers_folder(path):
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file())


def load_diffusers_folder(folder, variant=None, dtype=np.float32):
    """A diffusers Stable Diffusion folder -> StableDiffusion. variant: None (fp32 files, else fp16) or "fp16"."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        det.detect_diffusers_pipeline(_read_json(folder / "model_index.json", str(folder)), str(folder))
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            if part == "unet" and (folder / "transformer").is_dir():
                raise UserError(f"{folder}: unsupported: a transformer-based model (SD3 / FLUX / ...) with no "
                                f"unet/. minisd runs Stable Diffusion 1.x and 2.x only")
            raise UserError(f"{folder}: missing {part}/config.json; a Stable Diffusion diffusers folder has unet/, "
                            f"vae/, text_encoder/, tokenizer/ and scheduler/")
    ucfg_json = _read_json(folder / "unet" / "config.json", str(folder))
    ucfg = unet_config(ucfg_json, f"{folder}/unet/config.json")
    vcfg = vae_config(_read_json(folder / "vae" / "config.json", str(folder)), f"{folder}/vae/config.json")
    tcfg_json = _read_json(folder / "text_encoder" / "config.json", str(folder))

    unet_w = read_weights(find_weights(folder / "unet", "diffusion_pytorch_model", "diffusion_pytorch_model",
                                       variant))
    vae_w = _vae_modern_names(read_weights(find_weights(folder / "vae", "diffusion_pytorch_model",
                                                        "diffusion_pytorch_model", variant)))
    text_w = read_weights(find_weights(folder / "text_encoder", "model", "pytorch_model", variant))
    # position_ids is a buffer (0..76). transformers >= 5 saves CLIPTextModel without the "text_model." prefix
    # that SD folders (transformers 4) have: accept both.
    text_w = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
              for k, v in text_w.items() if not k.endswith("position_ids")}
    tcfg = text_config(tcfg_json, "text_projection.weight" in text_w, f"{folder}/text_encoder/config.json")

    unet_t = _renamed(unet_w, names.unet_ldm_to_diffusers(ucfg), f"{folder}/unet")
    vae_t = _renamed(vae_w, names.vae_ldm_to_diffusers(vcfg), f"{folder}/vae",
                     reshape=set(names.vae_attention_keys(vcfg)))
    text_t = _renamed(text_w, names.clip_ldm_to_transformers(tcfg), f"{folder}/text_encoder")
    try:
        unet = unet_model.UNet(ucfg, params=Params(unet_t, compute_dtype=dtype), dtype=dtype)
        vae = vae_model.VAE(vcfg, params=Params(vae_t, compute_dtype=dtype), dtype=dtype)
        text = clip_model.CLIPTextModel(tcfg, params=Params(text_t, compute_dtype=dtype), dtype=dtype)
    except ValueError as e:
        raise UserError(f"{folder}: tensor shapes do not match config.json: {e}") from None
    sched, sampler, unset = scheduler_config(folder)
    model = StableDiffusion(unet, vae, text, tokenizer_for(folder, tcfg), sched, sched.prediction_type,
                            ucfg_json.get("sample_size", 64), name=folder.name,
                            notes="converted from a diffusers folder")
    model.default_sampler, model.scheduler_unset = sampler, unset
    return model
